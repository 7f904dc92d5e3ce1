"""Document masking: packed documents do not see each other, and the default path is untouched.

Positions count from the start of the packed sequence (not of each document), so a document that
does not start the sequence only matches "the same document alone" under relative positions
(rotary); these tests pin both halves of that caveat.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import VOCAB, small_config

from cramkit.errors import ConfigError
from cramkit.models import base as model_base
from cramkit.models import build_model
from cramkit.models.docmask import build_document_mask, document_ids

# SEP plays the boundary token: [SEP] for bert data, the end-of-document token for gpt data.
CLS, SEP = 1, 2
PRESET = {"bert": "tiny", "gpt": "tiny-gpt"}


def _model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = small_config(PRESET[arch], **{"document_mask": True, "document_boundary_id": SEP, **overrides})
    return build_model(cfg).eval()


def _content(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen)


def _packed(arch: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One packed sequence of documents ``a`` and ``b`` framed as the packer frames them, and
    the length of the part that belongs to document ``a``."""
    sep = torch.tensor([SEP])
    if arch == "bert":  # [CLS] a [SEP] b [SEP]
        first = torch.cat([torch.tensor([CLS]), a, sep])
        return torch.cat([first, b, sep])[None], len(first)
    first = torch.cat([a, sep])  # a <eod> b <eod>
    return torch.cat([first, b, sep])[None], len(first)


def test_document_ids_count_boundaries_into_the_document_they_end():
    ids = torch.tensor([[CLS, 7, 8, SEP, 9, SEP], [7, SEP, SEP, 8, 9, 10]])
    assert document_ids(ids, SEP).tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 2, 2, 2]]


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_documents_do_not_see_each_other(arch, positions):
    model = _model(arch, positions=positions)
    a, b, b2, a2 = _content(5, 1), _content(6, 2), _content(6, 3), _content(5, 4)
    ids, n_a = _packed(arch, a, b)
    with torch.no_grad():
        out = model(ids).logits
        # Changing document b leaves every position of document a unchanged ...
        out_b2 = model(_packed(arch, a, b2)[0]).logits
        # ... and changing a leaves b unchanged, for the causal model too (b would see a).
        out_a2 = model(_packed(arch, a2, b)[0]).logits
    torch.testing.assert_close(out_b2[:, :n_a], out[:, :n_a])
    torch.testing.assert_close(out_a2[:, n_a:], out[:, n_a:])
    assert not torch.allclose(out_b2[:, n_a:], out[:, n_a:])


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_without_document_mask_the_documents_do_see_each_other(arch):
    """The teeth of the test above: the same change does reach the other document."""
    model = _model(arch, document_mask=False)
    a, b, a2 = _content(5, 1), _content(6, 2), _content(5, 4)
    ids, n_a = _packed(arch, a, b)
    with torch.no_grad():
        out, out_a2 = model(ids).logits, model(_packed(arch, a2, b)[0]).logits
    assert not torch.allclose(out_a2[:, n_a:], out[:, n_a:])


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_first_document_equals_running_it_alone(arch, positions):
    model = _model(arch, positions=positions)
    ids, n_a = _packed(arch, _content(5, 1), _content(6, 2))
    with torch.no_grad():
        packed = model.encode(ids)
        alone = model.encode(ids[:, :n_a])
    torch.testing.assert_close(packed[:, :n_a], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_later_document_equals_running_it_alone_only_with_relative_positions(arch):
    """Positions are per sequence: under rotary only relative offsets matter, so a later
    document gives what it gives alone; under absolute positions it does not."""
    a, b = _content(5, 1), _content(6, 2)
    for positions, same in (("rotary", True), ("learned", False)):
        model = _model(arch, positions=positions)
        ids, n_a = _packed(arch, a, b)
        with torch.no_grad():
            packed = model.encode(ids)[:, n_a:]
            alone = model.encode(ids[:, n_a:])
        assert torch.allclose(packed, alone, atol=1e-5, rtol=1e-5) is same, positions


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_document_mask_off_is_the_default_path(arch, monkeypatch):
    """With document_mask=false the boundary id changes nothing, bit for bit, and no document
    mask is ever built (SDPA keeps its unmasked fast path)."""

    def refuse(*args, **kwargs):
        raise AssertionError("document mask built with document_mask=false")

    monkeypatch.setattr(model_base, "build_document_mask", refuse)
    torch.manual_seed(0)
    default = build_model(small_config(PRESET[arch])).eval()
    configured = _model(arch, document_mask=False)
    ids, _ = _packed(arch, _content(5, 1), _content(6, 2))
    with torch.no_grad():
        assert torch.equal(default(ids).logits, configured(ids).logits)
        mask = torch.ones_like(ids)
        assert torch.equal(default(ids, attention_mask=mask).logits,
                           configured(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_kernel_agrees_with_dense_sdpa_mask(arch, padded):
    """Eager flex_attention runs forward-only on CPU; the CUDA test below covers gradients."""
    # Two rows of equal length, their boundaries at different places.
    ids = torch.cat([_packed(arch, _content(5, 1), _content(6, 2))[0],
                     _packed(arch, _content(3, 3), _content(8, 4))[0]])
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
    with torch.no_grad():
        dense = _model(arch, document_mask_kernel="sdpa")(ids, attention_mask=mask).logits
        flex = _model(arch, document_mask_kernel="flex")(ids, attention_mask=mask).logits
    assert torch.isfinite(dense).all()
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_auto_kernel_is_dense_on_cpu():
    ids, _ = _packed("gpt", _content(5, 1), _content(6, 2))
    mask = build_document_mask(ids, SEP, causal=True, kernel="auto")
    assert isinstance(mask, torch.Tensor) and mask.shape == (1, 1, ids.shape[1], ids.shape[1])


@pytest.mark.compile
def test_compiled_model_with_flex_is_one_graph_that_moving_boundaries_do_not_recompile():
    """The mask is built inside the compiled forward; a fresh mask_mod closure each step must
    not cost a recompile or a graph break. (Inductor has no CPU flex kernel here, so the graph
    runs with the aot_eager backend; the fused kernel is exercised on CUDA.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    flex = _model("gpt", document_mask_kernel="flex")
    dense = _model("gpt", document_mask_kernel="sdpa")
    compiled = torch.compile(flex, backend="aot_eager")
    graphs = []
    with torch.no_grad():
        for step in range(4):
            ids = torch.cat([_packed("gpt", _content(4 + step, step), _content(9 - step, 9))[0]] * 2)
            torch.testing.assert_close(compiled(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[0], graphs  # later steps reuse the first step's graphs
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 11):
        # torch 2.9 breaks the graph inside create_block_mask (dynamo cannot trace id() of the
        # mask function): still correct, still no recompiles, a few graphs instead of one.
        assert graphs[0] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_flex_kernel_agrees_with_dense_sdpa_on_cuda_with_gradients(arch):
    ids = torch.cat([_packed(arch, _content(20, 1), _content(30, 2))[0]] * 2).cuda()
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.3, ids, torch.full_like(ids, -100))
    outputs = {}
    for kernel in ("sdpa", "flex"):
        model = _model(arch, document_mask_kernel=kernel).cuda().train()
        loss = model(ids, labels=labels).loss
        loss.backward()
        outputs[kernel] = (loss.detach(), model.embeddings.tokens.weight.grad)
    torch.testing.assert_close(outputs["flex"][0], outputs["sdpa"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs["flex"][1], outputs["sdpa"][1], atol=1e-4, rtol=1e-4)


def test_document_mask_without_boundary_token_is_a_config_error():
    cfg = small_config(document_mask=True)
    with pytest.raises(ConfigError, match="document_boundary_id"):
        build_model(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"document_boundary_id": VOCAB}, "document_boundary_id must be a token id"),
        ({"document_boundary_id": -1}, "document_boundary_id must be a token id"),
        ({"document_mask_kernel": "flex", "attention_dropout": 0.1}, "no attention dropout"),
        ({"document_mask_kernel": "flexx"}, "did you mean 'flex'"),
    ],
)
def test_bad_document_mask_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(document_mask=True, **overrides)


def test_finetuning_drops_the_document_mask():
    """A fine-tuning input is one example (a pair task's [SEP] is no document boundary)."""
    from cramkit.eval.finetune import Backbone

    cfg = small_config(document_mask=True, document_boundary_id=SEP)
    model = Backbone(cfg, None, None, None).build(dropout=0.1, attention_dropout=0.1)
    assert model.config.document_mask is False


def test_a_flex_pretrained_model_fine_tunes_with_attention_dropout():
    """Fine-tuning turns the document mask off and adds attention dropout; the flex-only
    restriction must not follow a kernel choice that no longer applies."""
    from cramkit.eval.finetune import Backbone

    cfg = small_config(document_mask=True, document_boundary_id=3, document_mask_kernel="flex")
    model = build_model(cfg)
    tuned = Backbone(cfg, model.state_dict(), None, None, None).build(dropout=0.1, attention_dropout=0.1)
    assert not tuned.config.document_mask
    with pytest.raises(ConfigError, match="flex has no attention dropout"):
        build_model(small_config(document_mask=True, document_boundary_id=3, document_mask_kernel="flex",
                                 attention_dropout=0.1))


def _reference_mask(ids: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The document mask written out position by position, independently of docmask.py."""
    batch, seq_len = ids.shape
    allowed = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        doc, current = [], 0
        for t in range(seq_len):
            doc.append(current)
            current += int(ids[b, t] == SEP)  # the boundary ends its own document
        for q in range(seq_len):
            for k in range(seq_len):
                same = doc[q] == doc[k] and (valid is None or bool(valid[b, k]))
                allowed[b, 0, q, k] = (same and (k <= q or not causal)) or q == k
    return allowed


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("padded", [False, True])
def test_document_mask_matches_a_reference_on_random_boundaries(arch, padded):
    """Random boundaries (several in a row, at the start and the end included) and right
    padding: the mask each kernel builds, and the model's output, equal those of a mask written
    out by hand and given to the same blocks without document masking."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (4, 24), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = SEP
    ids[0, 0] = ids[1, -1] = ids[2, 5] = ids[2, 6] = SEP
    valid = None
    if padded:
        valid = torch.ones_like(ids)
        valid[0, -5:] = valid[3, -1:] = 0
    model = _model(arch, document_mask_kernel="sdpa")
    reference = _reference_mask(ids, valid, model.causal)
    dense = build_document_mask(ids, SEP, causal=model.causal, kernel="sdpa", attention_mask=valid)
    assert torch.equal(dense.expand_as(reference), reference)
    plain = build_model(model.config.replace(document_mask=False)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = plain.embeddings(ids)
        for block in plain.layers:
            x = block(x, reference)
        expected = plain.final_norm(x) if plain.final_norm is not None else x
        torch.testing.assert_close(model.encode(ids, attention_mask=valid), expected)
        flex = _model(arch, document_mask_kernel="flex")
        flex.load_state_dict(model.state_dict())
        torch.testing.assert_close(flex.encode(ids, attention_mask=valid), expected, atol=1e-5, rtol=1e-5)
