"""HSTU attention: semantics of the PyTorch reference, and parity of the Triton kernels with it (forward
and every gradient). The kernels run under TRITON_INTERPRET=1 (tests/conftest.py): shapes stay small."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from recsys.models.ops import hstu_attention
from recsys.models.ops.hstu_attention import hstu_attention_index, resolve_backend
from recsys.models.ops.pytorch.hstu_attention import time_bucket, time_bucket_thresholds
from recsys.models.ops.triton import hstu_attention as triton_module

NUM_BUCKETS = 129


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    normalizer: float
    tables: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # pos_weight / ts_weight (leaf, requires grad)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # query_ts / key_ts / num_candidates

    def kwargs(self) -> dict:
        return {"normalizer": self.normalizer, **self.tables, **self.extra}

    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, *self.tables.values()]


def make_case(
    *,
    seed: int,
    lengths: list[int],
    n: int,
    heads: int = 2,
    dim_qk: int = 8,
    dim_v: int = 8,
    max_pos: int | None = None,
    time_bias: bool = True,
    sorted_times: bool = True,
    num_candidates: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    strided: bool = False,
) -> Case:
    """Random inputs; max_pos=None means no position table, 0 means the spec's 2N-1 table. strided=True
    makes q, k, v views of one projection output (as the HSTU block has them), hence non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    proj = torch.randn(batch, n, heads, 2 * dim_qk + dim_v, generator=gen).to(dtype).requires_grad_()
    if strided:
        q, k, v = proj.split([dim_qk, dim_qk, dim_v], dim=-1)
    else:
        q, k, v = (t.detach().contiguous().requires_grad_() for t in proj.split([dim_qk, dim_qk, dim_v], -1))
    case = Case(q=q, k=k, v=v, lengths=torch.tensor(lengths, dtype=torch.int64), normalizer=float(n))
    if max_pos is not None:
        size = 2 * (max_pos or n) - 1
        case.tables["pos_weight"] = (0.5 * torch.randn(size, generator=gen)).requires_grad_()
    if time_bias:
        case.tables["ts_weight"] = (0.5 * torch.randn(NUM_BUCKETS, generator=gen)).requires_grad_()
        if sorted_times:  # event times ascending; query time = next event's time
            steps = torch.randint(0, 200_000, (batch, n + 1), generator=gen)
            times = torch.cumsum(steps, dim=1) + 1_600_000_000
            case.extra["query_ts"], case.extra["key_ts"] = (
                times[:, 1:].contiguous(),
                times[:, :-1].contiguous(),
            )
        else:  # any order and gaps from 0 to years: every bucket is in play
            case.extra["query_ts"] = torch.randint(0, 10**8, (batch, n), generator=gen)
            case.extra["key_ts"] = torch.randint(0, 10**8, (batch, n), generator=gen)
    if num_candidates is not None:
        case.extra["num_candidates"] = torch.tensor(num_candidates, dtype=torch.int64)
    return case


def run_with_grads(case: Case, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(case)
    batch, n, heads, dim_v = out.shape  # a non-contiguous upstream gradient: the kernels take any strides
    gen = torch.Generator().manual_seed(123)
    grad_out = torch.randn(batch, n, dim_v, heads, generator=gen).to(out.dtype).transpose(2, 3)
    grads = torch.autograd.grad(out, case.leaves(), grad_out)
    return out.detach(), list(grads)


def reference(case: Case) -> torch.Tensor:
    return hstu_attention(case.q, case.k, case.v, case.lengths, backend="pytorch", **case.kwargs())


def triton_fn(block_m: int | None = None, block_n: int | None = None):
    def run(case: Case) -> torch.Tensor:
        return triton_module.triton_hstu_attention(
            case.q, case.k, case.v, case.lengths, block_m=block_m, block_n=block_n, **case.kwargs()
        )

    return run


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), f"{name}: max abs err {err:.3e}"


# ---------------------------------------------------------------- Triton vs reference (interpreter)

PARITY_CASES = {
    # N=45 is not a multiple of 16; several blocks; a length-1 row; the spec's pos table (2N-1, unclamped).
    "ragged_multi_block": (
        dict(seed=1, lengths=[45, 17, 1], n=45, heads=1, dim_qk=8, dim_v=12, max_pos=0),
        16,
        16,
    ),
    # An empty row, no bias at all, H=1, dqk != dv, non-square blocks.
    "empty_row_no_bias": (
        dict(seed=2, lengths=[0, 37], n=37, heads=1, dim_qk=16, dim_v=4, time_bias=False),
        32,
        16,
    ),
    # A position table much shorter than the rows (clamped indices); unsorted times spanning all buckets.
    "clamped_pos_unsorted_times": (
        dict(seed=3, lengths=[36, 23], n=36, max_pos=5, sorted_times=False),
        16,
        16,
    ),
    # M-FALCON candidates: a block of candidates only, candidates straddling blocks, a row of candidates only.
    "candidates": (
        dict(seed=4, lengths=[40, 30, 5, 9], n=40, heads=1, max_pos=0, num_candidates=[20, 3, 0, 9]),
        16,
        16,
    ),
    # The interpreter's default (large) blocks, three heads, time bias only, q/k/v strided views.
    "default_blocks_strided": (
        dict(seed=5, lengths=[50, 31], n=50, heads=3, dim_qk=4, dim_v=6, strided=True),
        None,
        None,
    ),
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_triton_matches_reference_forward_and_all_grads(name: str) -> None:
    params, block_m, block_n = PARITY_CASES[name]
    case = make_case(**params)
    want_out, want_grads = run_with_grads(case, reference)
    got_out, got_grads = run_with_grads(case, triton_fn(block_m, block_n))

    assert got_out.shape == want_out.shape and got_out.dtype == want_out.dtype
    assert_close("out", got_out, want_out, atol=1e-4, rtol=1e-4)
    names = ["dq", "dk", "dv", *(f"d{t}" for t in case.tables)]
    for grad_name, got, want in zip(names, got_grads, want_grads, strict=True):
        assert_close(grad_name, got, want, atol=1e-4, rtol=1e-4)
    # Padding: zero output rows, zero gradients at padded positions.
    for b, length in enumerate(case.lengths.tolist()):
        assert got_out[b, length:].abs().sum().item() == 0.0
        for grad in got_grads[:3]:
            assert grad[b, length:].abs().sum().item() == 0.0


def test_triton_dispatch_fp16_accumulates_in_fp32() -> None:
    case = make_case(seed=6, lengths=[33, 20], n=33, max_pos=0, dtype=torch.float16)
    out, grads = run_with_grads(
        case, lambda c: hstu_attention(c.q, c.k, c.v, c.lengths, backend="triton", **c.kwargs())
    )
    want_out, want_grads = run_with_grads(case, reference)  # the reference upcasts half inputs to fp32
    assert out.dtype == torch.float16
    assert_close("out", out, want_out, atol=2e-3, rtol=2e-2)
    for grad_name, got, want in zip(["dq", "dk", "dv", "dpos", "dts"], grads, want_grads, strict=True):
        assert_close(grad_name, got, want, atol=5e-3, rtol=2e-2)


def test_triton_time_buckets_match_reference_at_every_boundary() -> None:
    # Every position is a candidate after an empty history, so it sees only itself: out_i = SiLU(w[bucket_i]).
    thresholds = time_bucket_thresholds(NUM_BUCKETS)[:NUM_BUCKETS]
    gaps = torch.cat([thresholds - 1, thresholds, thresholds + 1, -thresholds, torch.tensor([0])])
    n = gaps.numel()
    key_ts = torch.full((1, n), 10**17, dtype=torch.int64)
    ts_weight = torch.linspace(0.1, 3.0, NUM_BUCKETS)  # distinct, so a wrong bucket shows in the output
    zeros = torch.zeros(1, n, 1, 4)
    kwargs = dict(
        normalizer=1.0,
        ts_weight=ts_weight,
        query_ts=key_ts + gaps[None, :],
        key_ts=key_ts,
        num_candidates=torch.tensor([n]),
    )
    v = torch.ones(1, n, 1, 1)
    lengths = torch.tensor([n])
    got = hstu_attention(zeros, zeros, v, lengths, backend="triton", **kwargs)[0, :, 0, 0]
    want = hstu_attention(zeros, zeros, v, lengths, backend="pytorch", **kwargs)[0, :, 0, 0]
    # Neighbouring buckets differ by >= 0.01 in the output; SiLU itself may differ in the last bits.
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(want, F.silu(ts_weight[time_bucket(gaps, NUM_BUCKETS)]), atol=1e-6, rtol=0)


def test_triton_backend_without_gpu_or_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_module, "_is_interpreted", lambda: False)
    case = make_case(seed=7, lengths=[3], n=3, time_bias=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hstu_attention(case.q, case.k, case.v, case.lengths, normalizer=3.0, backend="triton")


def test_auto_backend_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("auto must not pick the Triton kernel for CPU tensors")

    monkeypatch.setattr(triton_module, "triton_hstu_attention", fail)
    case = make_case(seed=8, lengths=[5, 2], n=5, max_pos=0)
    out = hstu_attention(case.q, case.k, case.v, case.lengths, **case.kwargs())
    assert torch.equal(out, reference(case))


# ---------------------------------------------------------------- reference semantics


def test_reference_hand_computed_tiny_case() -> None:
    # B=1, N=2, H=1, d=1. pos table max_pos=2: [w(-1), w(0), w(+1)]. One time gap per pair.
    q = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    k = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    v = torch.tensor([3.0, 5.0]).view(1, 2, 1, 1)
    pos_weight = torch.tensor([0.1, 0.2, 0.3])
    ts_weight = torch.zeros(NUM_BUCKETS)
    ts_weight[0], ts_weight[2] = 0.05, -0.4
    query_ts = torch.tensor(
        [[101, 102]]
    )  # gaps: (0,0)=1 -> bucket 0, (1,0)=2 -> bucket 2, (1,1)=1 -> bucket 0
    key_ts = torch.tensor([[100, 101]])
    out = hstu_attention(
        q,
        k,
        v,
        torch.tensor([2]),
        normalizer=2.0,
        pos_weight=pos_weight,
        ts_weight=ts_weight,
        query_ts=query_ts,
        key_ts=key_ts,
        backend="pytorch",
    )

    def silu(x: float) -> float:
        return x / (1.0 + math.exp(-x))

    s00 = 1.0 * 0.5 + 0.2 + 0.05  # same position, gap 1
    s10 = 2.0 * 0.5 + 0.1 - 0.4  # key one step back, gap 2
    s11 = 2.0 * -1.0 + 0.2 + 0.05
    want = torch.tensor([silu(s00) * 3.0 / 2.0, (silu(s10) * 3.0 + silu(s11) * 5.0) / 2.0])
    assert torch.allclose(out.view(2), want, atol=1e-6)


def test_reference_is_causal() -> None:
    case = make_case(seed=9, lengths=[12], n=12, max_pos=0)
    base = reference(case).detach()
    with torch.no_grad():
        k, v = case.k.clone(), case.v.clone()
        k[0, 7] += 10.0
        v[0, 7] -= 10.0
    perturbed = hstu_attention(k=k, v=v, q=case.q, lengths=case.lengths, backend="pytorch", **case.kwargs())
    assert torch.equal(perturbed[0, :7], base[0, :7])
    assert not torch.allclose(perturbed[0, 7:], base[0, 7:])


def test_reference_padding_is_zero_and_ignored() -> None:
    case = make_case(seed=10, lengths=[6, 0, 9], n=9, max_pos=0)
    base = reference(case).detach()
    assert base[0, 6:].abs().sum() == 0 and base[1].abs().sum() == 0
    with torch.no_grad():  # garbage in the padding (keys, values, times) must not leak into valid rows
        q, k, v = case.q.clone(), case.k.clone(), case.v.clone()
        q[0, 6:], k[0, 6:], v[0, 6:] = 50.0, -50.0, 1e3
        case.extra["key_ts"][0, 6:] = 0
    noisy = hstu_attention(q, k, v, case.lengths, backend="pytorch", **case.kwargs())
    assert torch.equal(noisy[0, :6], base[0, :6]) and noisy[0, 6:].abs().sum() == 0


def test_reference_candidates_are_independent_and_share_one_position() -> None:
    # M-FALCON: scoring all candidates in one pass equals scoring each alone after the same history.
    history, num_cand = 7, 4
    case = make_case(seed=11, lengths=[history + num_cand], n=history + num_cand, max_pos=0)
    case.extra["num_candidates"] = torch.tensor([num_cand])
    full = reference(case).detach()
    for c in range(num_cand):
        keep = [*range(history), history + c]
        single = hstu_attention(
            case.q[:, keep],
            case.k[:, keep],
            case.v[:, keep],
            torch.tensor([history + 1]),
            normalizer=case.normalizer,
            pos_weight=case.tables["pos_weight"],
            ts_weight=case.tables["ts_weight"],
            query_ts=case.extra["query_ts"][:, keep],
            key_ts=case.extra["key_ts"][:, keep],
            num_candidates=torch.tensor([1]),
            backend="pytorch",
        ).detach()
        assert torch.allclose(single[0, history], full[0, history + c], atol=1e-6)
        assert torch.allclose(single[0, :history], full[0, :history], atol=1e-6)


def test_time_bucket_at_known_gaps() -> None:
    gaps = torch.tensor([0, 1, 2, 3, 60, 3600, -3600, 86_400, 10**12, 10**18])
    # floor(ln(g) / 0.301): ln 2 / .301 = 2.30, ln 3 = 3.65, ln 60 = 13.6, ln 3600 = 27.2, ln 86400 = 37.8,
    # ln 1e12 = 91.8, ln 1e18 = 137.7 -> clamped to 128.
    assert time_bucket(gaps, NUM_BUCKETS).tolist() == [0, 0, 2, 3, 13, 27, 27, 37, 91, 128]
    assert time_bucket(gaps, 10).tolist() == [0, 0, 2, 3, 9, 9, 9, 9, 9, 9]


def test_time_bucket_thresholds_are_exact() -> None:
    thresholds = time_bucket_thresholds(NUM_BUCKETS)
    assert thresholds[0] == 1 and thresholds[-1] == torch.iinfo(torch.int64).max
    for k in range(1, 60):  # fp64 is exact enough here to check ceil(e^(0.301 k))
        t = int(thresholds[k])
        assert math.log(t) / 0.301 >= k > math.log(t - 1) / 0.301
    # Threshold k is the first gap of bucket >= k (bucket 1 has no integer gap: e^0.301, e^0.602 ceil to 2).
    below = time_bucket(thresholds[1:NUM_BUCKETS] - 1, NUM_BUCKETS)
    at = time_bucket(thresholds[1:NUM_BUCKETS], NUM_BUCKETS)
    ks = torch.arange(1, NUM_BUCKETS)
    assert bool((below < ks).all()) and bool((at >= ks).all())
    assert bool(((at == ks) | (thresholds[1:NUM_BUCKETS] == thresholds[2 : NUM_BUCKETS + 1])).all())


# ---------------------------------------------------------------- input validation


def test_bad_inputs_raise_clear_errors() -> None:
    case = make_case(seed=12, lengths=[4, 2], n=4, max_pos=0)
    q, k, v, lengths = case.q, case.k, case.v, case.lengths

    def call(**overrides):
        kwargs = {
            "q": q,
            "k": k,
            "v": v,
            "lengths": lengths,
            "normalizer": 4.0,
            "backend": "pytorch",
            **overrides,
        }
        return hstu_attention(**kwargs)

    with pytest.raises(ValueError, match="lengths must lie in"):
        call(lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="num_candidates must lie in"):
        call(num_candidates=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="go together"):
        call(ts_weight=case.tables["ts_weight"])
    with pytest.raises(ValueError, match="odd"):
        call(pos_weight=torch.zeros(6))
    with pytest.raises(ValueError, match="k must have q's shape"):
        call(k=k[:, :3])
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        call(lengths=lengths.float())
    with pytest.raises(ValueError, match="normalizer"):
        call(normalizer=0.0)
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
@pytest.mark.parametrize("lengths, n", [([], 5), ([0, 0], 0)])
def test_empty_batch_or_sequence_gives_empty_output_and_grads(
    backend: str, lengths: list[int], n: int
) -> None:
    case = make_case(seed=13, lengths=lengths, n=n, max_pos=None if n == 0 else 0, time_bias=n > 0)
    case.normalizer = 1.0  # the spec's N would be 0 here
    out, grads = run_with_grads(
        case, lambda c: hstu_attention(c.q, c.k, c.v, c.lengths, backend=backend, **c.kwargs())
    )
    assert out.shape == (len(lengths), n, 2, 8)
    for grad, leaf in zip(grads, case.leaves(), strict=True):
        assert grad.shape == leaf.shape and grad.abs().sum() == 0


# ---------------------------------------------------------------- the shared attention index


def _index_for(case: Case):
    return hstu_attention_index(
        case.lengths,
        case.q.shape[1],
        max_pos=(case.tables["pos_weight"].numel() + 1) // 2 if "pos_weight" in case.tables else None,
        num_buckets=case.tables["ts_weight"].numel() if "ts_weight" in case.tables else None,
        query_ts=case.extra.get("query_ts"),
        key_ts=case.extra.get("key_ts"),
        num_candidates=case.extra.get("num_candidates"),
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(seed=20, lengths=[7, 3, 1], n=7, max_pos=0),  # both tables
        dict(seed=21, lengths=[6, 2], n=6, max_pos=3, time_bias=False),  # position only, clamped
        dict(seed=22, lengths=[5, 5], n=5, sorted_times=False),  # time only, every bucket in play
        dict(seed=23, lengths=[6, 4], n=6, max_pos=0, num_candidates=[2, 4]),  # M-FALCON candidates
        dict(seed=24, lengths=[4], n=4, time_bias=False),  # no bias at all
    ],
)
def test_precomputed_index_gives_the_same_output_and_grads(params: dict) -> None:
    case = make_case(**params)
    index = _index_for(case)
    want_out, want_grads = run_with_grads(case, reference)
    got_out, got_grads = run_with_grads(
        case,
        lambda c: hstu_attention(c.q, c.k, c.v, c.lengths, index=index, backend="pytorch", **c.kwargs()),
    )
    assert torch.equal(got_out, want_out)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.equal(got, want)


def test_index_entries_are_the_spec_position_and_bucket() -> None:
    case = make_case(seed=25, lengths=[5, 3], n=5, max_pos=0, sorted_times=False)
    index = _index_for(case)
    rel, bucket = index.bias_index // NUM_BUCKETS, index.bias_index % NUM_BUCKETS
    for b, length in enumerate([5, 3]):
        for i in range(length):
            for j in range(i + 1):
                assert bool(index.allowed[b, i, j]) and int(rel[b, i, j]) == j - i + 4
                gap = int(case.extra["query_ts"][b, i] - case.extra["key_ts"][b, j])
                assert int(bucket[b, i, j]) == min(
                    max(math.floor(math.log(max(abs(gap), 1)) / 0.301), 0), 128
                )
    assert int(index.allowed.sum()) == 15 + 6  # causal pairs within each row's length only


def test_triton_path_accepts_the_index_and_ignores_it() -> None:
    case = make_case(seed=26, lengths=[9, 4], n=9, max_pos=0)
    index = _index_for(case)
    plain = hstu_attention(case.q, case.k, case.v, case.lengths, backend="triton", **case.kwargs())
    with_index = hstu_attention(
        case.q, case.k, case.v, case.lengths, index=index, backend="triton", **case.kwargs()
    )
    assert torch.equal(plain, with_index)
    assert_close("out", with_index, reference(case), atol=1e-4, rtol=1e-4)


def test_mismatched_index_is_a_clear_error() -> None:
    case = make_case(seed=27, lengths=[4, 2], n=4, max_pos=0)
    index = _index_for(case)

    def call(index, **overrides):
        kwargs = {**case.kwargs(), **overrides}
        return hstu_attention(case.q, case.k, case.v, case.lengths, index=index, backend="pytorch", **kwargs)

    narrow = make_case(seed=27, lengths=[3, 2], n=3, max_pos=0)
    with pytest.raises(ValueError, match=r"index was built for shape \[2, 3, 3\]"):
        call(_index_for(narrow))
    with pytest.raises(ValueError, match="index was built for max_pos=4, num_buckets=129"):
        call(index, pos_weight=torch.zeros(9))
    no_time = {"ts_weight": None, "query_ts": None, "key_ts": None}
    with pytest.raises(ValueError, match="num_buckets=None"):
        call(index, **no_time)
    with pytest.raises(ValueError, match="num_buckets needs query_ts and key_ts"):
        hstu_attention_index(case.lengths, 4, num_buckets=NUM_BUCKETS)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "pytorch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("cuda", torch.device("cpu"))  # type: ignore[arg-type]
