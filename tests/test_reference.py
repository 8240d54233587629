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


def _loss_rows_by_hand(mask_row: list[int], k: int) -> list[int]:
    """The min(K, n - 1) real positions just before the last real one, ascending."""
    real = [i for i, m in enumerate(mask_row) if m]
    return real[max(0, len(real) - 1 - k):-1] if real else []


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_positions_skip_the_last_valid_token(side):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    if side == "left":
        mask = mask.flip(1)
    rows, valid = reference.loss_positions(mask, 2, 7, 3)
    assert valid.all()
    real = [torch.nonzero(m).flatten().tolist() for m in mask]
    assert rows.tolist() == [v[-4:-1] for v in real]


def test_loss_positions_of_short_samples_hand_worked():
    # K = 4; samples with 7, 3, 2, 1 and 0 real tokens, and one with holes.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 1, 1],
                         [0, 0, 0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0, 0, 0],
                         [1, 0, 1, 0, 1, 1, 0]])
    rows, valid = reference.loss_positions(mask, 6, 7, 4)
    assert rows.dtype == torch.int64 and valid.dtype == torch.bool and rows.shape == valid.shape == (6, 4)
    assert valid.tolist() == [[True] * 4, [False, False, True, True], [False, False, False, True],
                              [False] * 4, [False] * 4, [False, True, True, True]]
    # loss rows right-aligned and ascending; an empty slot holds S - 1 = 6
    assert rows.tolist() == [[2, 3, 4, 5], [6, 6, 0, 1], [6, 6, 6, 5], [6, 6, 6, 6], [6, 6, 6, 6], [6, 0, 2, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_loss_positions_match_the_definition_on_random_masks(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(7, 11, generator=gen) < 0.3 + 0.1 * seed).long()
    for k in (1, 3, 10, 12):
        rows, valid = reference.loss_positions(mask, 7, 11, k)
        for b in range(7):
            want = _loss_rows_by_hand(mask[b].tolist(), k)
            assert rows[b][valid[b]].tolist() == want
            assert int(valid[b].sum()) == len(want) == min(k, max(int(mask[b].sum()) - 1, 0))
            assert (rows[b][~valid[b]] == 10).all()  # never a loss row: nothing real comes after it


def test_loss_positions_without_mask():
    rows, valid = reference.loss_positions(None, 2, 6, 4)
    assert rows.tolist() == [[1, 2, 3, 4]] * 2 and valid.all()
    rows, valid = reference.loss_positions(None, 1, 3, 4)  # K larger than the sequence
    assert rows.tolist() == [[2, 2, 0, 1]] and valid.tolist() == [[False, False, True, True]]
    rows, valid = reference.loss_positions(None, 1, 1, 2)
    assert not valid.any() and rows.tolist() == [[0, 0]]


def test_loss_positions_check_num_positions():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_positions"):
            reference.loss_positions(torch.ones(1, 5), 1, 5, bad)


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
