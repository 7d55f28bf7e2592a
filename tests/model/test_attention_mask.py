"""The inpainting attention mask: qimg's split two-call attention against a dense N x N mask (CPU, fp32).

Semantics: kept image tokens attend only to kept image tokens; text and edited image tokens attend to
everything ([text; image], padded text keys excluded). The dense reference below is written straight
from that sentence, as the seed article does it: one bool mask, one SDPA call.
"""

import pytest
import torch
import torch.nn.functional as F

import qimg.model.transformer as transformer
from qimg.model.transformer import QwenImageTransformer, TransformerConfig, attention_plan, split_attention

CFG = TransformerConfig.tiny()
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_mask(keep: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
    """(L,) keep, (B, S) txt_mask -> (B, 1, N, N) bool, True = query (row) may attend to key (column)."""
    b, s = txt_mask.shape
    kept = torch.cat([torch.zeros(s, dtype=torch.bool), keep])  # (N,): text is never "kept"
    allowed = ~kept[:, None] | kept[None, :]  # free queries see all; kept queries see kept keys only
    real_key = torch.cat([txt_mask.bool(), torch.ones(b, keep.numel(), dtype=torch.bool)], dim=1)  # (B, N)
    return allowed[None, None] & real_key[:, None, None, :]


def dense_attention(q, k, v, mask):
    """(B, N, H, D) each, (B, 1, N, N) mask -> (B, N, H*D): the article's one masked SDPA call."""
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return x.transpose(1, 2).flatten(2)


def rect_keep(h, w, top, left, bottom, right):
    """(h*w,) keep mask with an edited rectangle [top:bottom, left:right] in a row-major h x w grid."""
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[top:bottom, left:right] = False
    return keep.flatten()


# --- the free function ------------------------------------------------------------------------------


@pytest.mark.parametrize("kept_fraction", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_split_attention_matches_dense(kept_fraction, padded):
    g = torch.Generator().manual_seed(0)
    b, s, n, heads, d = 2, 7, 40, 3, 16
    q, k, v = (torch.randn(b, s + n, heads, d, generator=g) for _ in range(3))
    keep = torch.rand(n, generator=g) < kept_fraction if kept_fraction < 1 else torch.ones(n, dtype=torch.bool)
    txt_mask = torch.ones(b, s, dtype=torch.long)
    if padded:
        txt_mask[1, 4:] = 0
    plan = attention_plan(txt_mask, keep, s, n)
    assert plan.kept is not None and (plan.mask is not None) == padded

    out = split_attention(q, k, v, plan.mask, plan.kept, plan.rest)
    expected = dense_attention(q, k, v, dense_mask(keep, txt_mask))
    assert (out - expected).abs().max() <= TOL


def test_plan_edge_cases():
    keep = torch.tensor([True, False, True, False, False])
    plan = attention_plan(None, keep, txt_len=3, img_len=5)
    assert plan.kept.tolist() == [3, 5]
    assert plan.rest.tolist() == [0, 1, 2, 4, 6, 7]
    assert plan.mask is None

    nothing_kept = attention_plan(None, torch.zeros(5, dtype=torch.bool), txt_len=3, img_len=5)
    assert nothing_kept == (None, None, None, None, None)  # plain attention, not a split with an empty group

    all_kept = attention_plan(None, torch.ones(5, dtype=torch.bool), txt_len=3, img_len=5)
    assert all_kept.rest.tolist() == [0, 1, 2]  # only text attends to everything


# --- through the whole model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = QwenImageTransformer(CFG).eval()
    with torch.no_grad():  # move norm weights off 1 (and everything else) so a skipped norm would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(b, h, w, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, h * w, CFG.in_channels, generator=g)
    txt = torch.randn(b, s, CFG.joint_attention_dim, generator=g)
    return img, txt, torch.linspace(0.3, 0.8, b)


@torch.no_grad()
def dense_forward(model, monkeypatch, img, txt, txt_mask, t, grid, keep):
    """The same model, every block's attention replaced by the dense reference built from `keep`."""
    b, s = txt.shape[:2]
    mask = dense_mask(keep, txt_mask if txt_mask is not None else torch.ones(b, s))
    with monkeypatch.context() as m:
        m.setattr(transformer, "attention", lambda q, k, v, _: dense_attention(q, k, v, mask))
        return model(img, txt, txt_mask, t, grid)  # keep=None: the plain path, whose attention we patched


@pytest.mark.parametrize(
    "grid, hole", [((5, 7), (1, 2, 4, 5)), ((4, 4), (0, 0, 4, 2)), ((6, 6), (2, 2, 3, 3))],
    ids=["5x7-centre", "4x4-left-half", "6x6-one-token"],
)
def test_model_matches_dense_reference(model, monkeypatch, grid, hole):
    img, txt, t = inputs(1, *grid, s=6)
    keep = rect_keep(*grid, *hole)
    with torch.no_grad():
        out = model(img, txt, None, t, grid, keep=keep)
    expected = dense_forward(model, monkeypatch, img, txt, None, t, grid, keep)
    assert (out - expected).abs().max() <= TOL
    assert (out - model(img, txt, None, t, grid)).abs().max() > 1e-3  # the mask does change the output


def test_padded_batch_matches_dense_reference(model, monkeypatch):
    img, txt, t = inputs(2, 5, 7, s=9)
    txt_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    keep = rect_keep(5, 7, 1, 1, 4, 4)
    with torch.no_grad():
        out = model(img, txt, txt_mask, t, (5, 7), keep=keep)
    expected = dense_forward(model, monkeypatch, img, txt, txt_mask, t, (5, 7), keep)
    assert (out - expected).abs().max() <= TOL

    # Padding must not leak: the short prompt alone, unpadded, gives the same image output.
    with torch.no_grad():
        alone = model(img[1:], txt[1:, :5], None, t[1:], (5, 7), keep=keep)
    assert (out[1:] - alone).abs().max() <= TOL


@torch.no_grad()
def test_no_keep_and_nothing_kept_are_plain_attention(model):
    img, txt, t = inputs(2, 4, 5, s=5)
    txt_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    plain = model(img, txt, txt_mask, t, (4, 5))
    assert torch.equal(model(img, txt, txt_mask, t, (4, 5), keep=None), plain)
    assert torch.equal(model(img, txt, txt_mask, t, (4, 5), keep=torch.zeros(20, dtype=torch.bool)), plain)


@torch.no_grad()
def test_nothing_leaks_out_of_the_hole(model):
    grid = (5, 6)
    keep = rect_keep(*grid, 1, 1, 4, 3)
    img, txt, t = inputs(1, *grid, s=6)
    # New content in the hole and a different prompt: kept tokens attend to neither.
    img2, txt2 = img.clone(), torch.randn_like(txt)
    img2[:, ~keep] = torch.randn_like(img2[:, ~keep])

    out, out2 = model(img, txt, None, t, grid, keep=keep), model(img2, txt2, None, t, grid, keep=keep)
    assert (out[:, keep] - out2[:, keep]).abs().max() <= 1e-6
    assert (out[:, ~keep] - out2[:, ~keep]).abs().max() > 1e-2  # the hole does see the change
    # ...and without the mask the same change does reach the kept tokens (so the check above can fail).
    plain, plain2 = model(img, txt, None, t, grid), model(img2, txt2, None, t, grid)
    assert (plain[:, keep] - plain2[:, keep]).abs().max() > 1e-2


def test_bad_keep_is_refused(model):
    img, txt, t = inputs(1, 4, 4, s=3)
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape"):
        model(img, txt, None, t, (4, 4), keep=torch.ones(15, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape"):
        model(img, txt, None, t, (4, 4), keep=torch.ones(16))


@torch.no_grad()
def test_reference_tokens_see_everything_and_are_seen_by_the_hole_only(model, monkeypatch):
    # Instruction editing: a reference picture's tokens follow the noisy grid's. With a keep mask they are
    # never kept: like text they attend to every token, and only text and edited tokens attend to them.
    grid, refs = (4, 5), ((3, 3),)
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(1, 29, CFG.in_channels, generator=g), torch.randn(1, 6, CFG.joint_attention_dim, generator=g)
    t, keep = torch.tensor([0.6]), rect_keep(*grid, 1, 1, 3, 3)
    out = model(img, txt, None, t, grid, keep=keep, refs=refs)
    mask = dense_mask(torch.cat([keep, torch.zeros(9, dtype=torch.bool)]), torch.ones(1, 6))
    with monkeypatch.context() as m:
        m.setattr(transformer, "attention", lambda q, k, v, _: dense_attention(q, k, v, mask))
        expected = model(img, txt, None, t, grid, refs=refs)
    assert out.shape == (1, 20, 4 * CFG.out_channels) and (out - expected).abs().max() <= TOL
