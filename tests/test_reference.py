"""The oracle itself, on cases small enough to check on paper (SPEC sections 2.3 and 3)."""
import math

import pytest
import torch

from pio_kernels import reference


def _four_tokens():
    # t0 and t1 are near-duplicates (cos ~0.995); t2 is orthogonal to t0; t3 opposes t0.
    features = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    scores = torch.tensor([0.9, 0.8, 0.5, 0.1])
    return features[None], scores[None]


@pytest.mark.parametrize("budget,expected", [(1, [0]), (2, [0, 2]), (3, [0, 2, 3]), (4, [0, 1, 2, 3])])
def test_hand_worked_four_tokens(budget, expected):
    # order 0,1,2,3; picking 0 suppresses 1 (cos 0.995 >= 0.8); 2 and 3 survive; the fill
    # pass brings 1 back only when the budget asks for all four.
    features, scores = _four_tokens()
    assert reference.select_tokens(features, scores, budget, tau=0.8).tolist() == [expected]


def test_tau_above_one_is_top_k():
    features, scores = _four_tokens()
    assert reference.select_tokens(features, scores, 2, tau=1.5).tolist() == [[0, 1]]


def test_tau_minus_one_keeps_first_then_fills_in_order():
    # Every token neighbours every other: the strict pass picks one, the fill pass the rest.
    features, scores = _four_tokens()
    assert reference.select_tokens(features, scores, 3, tau=-1.0).tolist() == [[0, 1, 2]]


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    scores = torch.tensor([1.0, float("nan"), 2.0, 1.0, float("-inf"), 2.0])
    assert reference.saliency_order(scores).tolist() == [2, 5, 0, 3, 4, 1]
    features = torch.eye(6)  # mutually orthogonal: no suppression
    out = reference.select_tokens(features[None], scores[None], 5, tau=0.8)
    assert out.tolist() == [[0, 2, 3, 4, 5]]


def test_short_rows_keep_everything_and_pad():
    features = torch.randn(2, 5, 3)
    scores = torch.rand(2, 5)
    out = reference.select_tokens(features, scores, 4, lengths=torch.tensor([5, 3]))
    assert out[1].tolist() == [0, 1, 2, -1]
    assert out.shape == (2, 4) and (out[0] >= 0).all()


def test_zero_rows_are_nobodys_neighbour_above_zero():
    features = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    assert reference.select_tokens(features, scores, 2, tau=0.5).tolist() == [[0, 1]]
    assert reference.select_tokens(features, scores, 2, tau=0.0).tolist() == [[0, 1]]  # fill pass


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_positions_skip_the_last_valid_token(side):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    if side == "left":
        mask = mask.flip(1)
    rows = reference.loss_positions(mask, 2, 7, 3)
    valid = [torch.nonzero(m).flatten().tolist() for m in mask]
    assert rows.tolist() == [v[-4:-1] for v in valid]


def test_loss_positions_without_mask_and_too_short():
    assert reference.loss_positions(None, 2, 6, 4).tolist() == [[1, 2, 3, 4]] * 2
    with pytest.raises(ValueError, match="num_positions"):
        reference.loss_positions(torch.tensor([[0, 1, 1, 1, 1]]), 1, 5, 4)
    with pytest.raises(ValueError, match="num_positions"):
        reference.loss_positions(None, 1, 4, 4)


def test_causal_padding_mask_rows_never_empty():
    mask = reference._causal_padding_mask(torch.tensor([[0, 0, 1, 1]]), 1, 4, torch.float32, torch.device("cpu"))
    allowed = mask[0, 0] == 0
    assert allowed.any(dim=-1).all()
    assert allowed[3].tolist() == [False, False, True, True]
    assert not math.isnan(mask.softmax(-1).sum().item())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_proxy_saliency_runs_where_generation_runs(mode):
    from layer_factory import make_stage, padded_batch, positions_from_mask

    st = make_stage("llama")
    mask = padded_batch([9, 6], 9, "left")
    h = torch.randn(2, 9, st.hidden_size)
    cos, sin = st.rope(h, positions_from_mask(mask))
    want = reference.proxy_saliency(st.layer, st.final_norm, st.lm_head, h, (cos, sin), attention_mask=mask)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        h2, mask2 = h.clone(), mask.clone()  # inference tensors under inference_mode
        cos2, sin2 = st.rope(h2, positions_from_mask(mask2))
        got = reference.proxy_saliency(st.layer, st.final_norm, st.lm_head, h2, (cos2, sin2), attention_mask=mask2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[1, :3] == 0).all() and (got[1, 3:7] > 0).all()
