"""The fast paths behind streamed width growth give, bit for bit, what the reference constructions give.

``split_columns`` groups the copies of each position with tensor ops (``_split_fast``) and falls back
to the one-group-at-a-time reference (``_split_reference``) on non-finite tensors; ``take``/``put``
copy along inner dimensions through numpy; ``share_out`` skips a float64 round trip when every
total is 1; ``remap`` reuses its answer for the same layout and channel list; the streamed writer
computes the next rewritten tensor on a worker thread. Every case compares bits (an integer view),
so ``-0``, NaN payloads and rounding all count.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from growcli.analysis.layouts import CORE, Cat, Fixed
from growcli.transforms import splits
from growcli.transforms.channels import channel_map, remap, split_factors

INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.element_size()])


def reference(old, dim, idx, share, split):
    """split_columns as it was: index_select, then every group of copies one at a time."""
    got = torch.where(split, share, torch.ones_like(share))
    new = old.index_select(dim, idx)
    if bool(split.any()):
        splits._split_reference(new, old, dim, idx, share, got, split)
    return new, got


def case(seed: int, dtype: torch.dtype, mode: str, dim: int, shares: str, values: str):
    gen = torch.Generator().manual_seed(seed)
    n, m = 23, 9 + 5 * seed
    g = torch.tensor(channel_map(n, n + m, 1, gen))
    share = split_factors(g.tolist(), n, mode, "net2net", gen)
    if shares == "odd":  # powers of two, thirds, a zero: every branch of the construction
        share = share.clone()
        share[::3], share[1::5], share[2::7] = 0.5, 1 / 3, 0.0
    shape = [n, 4] if dim == 0 else [3, n, 2][: dim + 1] + ([2] if dim == 1 else [])
    old = torch.randn(shape, generator=gen).to(dtype)
    flat = old.view(-1)
    flat[::5], flat[1::7] = 0.0, -0.0
    if values == "inf":
        flat[2] = float("inf")
    elif values == "nan":
        flat[3] = float("nan")
    split = torch.rand(len(g), generator=gen) < 0.8 if seed % 2 else torch.ones(len(g), dtype=torch.bool)
    return old, dim, g, share, split


CASES = list(itertools.product(range(3), [torch.bfloat16, torch.float16, torch.float32], ["asymmetric", "uniform"],
                               [0, 1], ["asked", "odd"], ["finite", "inf", "nan"]))


@pytest.mark.parametrize("args", CASES, ids=lambda a: "-".join(str(x).removeprefix("torch.") for x in a))
def test_split_columns_equals_the_reference_bit_for_bit(args):
    old, dim, idx, share, split = case(*args)
    new, got = splits.split_columns(old, dim, idx, share, split)
    want, want_got = reference(old, dim, idx, share, split)
    assert new.shape == want.shape and new.dtype == old.dtype
    assert torch.equal(bits(new), bits(want)) and torch.equal(got, want_got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_take_and_put_equal_index_select_and_index_copy(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    old = torch.randn(5, 6, 7, generator=gen).to(dtype)
    old.view(-1)[::4] = float("nan")
    idx = torch.randint(0, old.shape[dim], (11,), generator=gen)
    assert torch.equal(bits(splits.take(old, dim, idx)), bits(old.index_select(dim, idx)))
    pos = torch.randperm(old.shape[dim], generator=gen)[:3]
    values = torch.randn(*[3 if d == dim else s for d, s in enumerate(old.shape)], generator=gen).to(dtype)
    a, b = old.clone(), old.clone()
    splits.put(a, dim, pos, values)
    b.index_copy_(dim, pos, values)
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("totals", ["ones", "scaled"])
def test_share_out_equals_its_float64_construction(dtype, totals):
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(4, 10, generator=gen).to(dtype)
    src = torch.tensor([0, 0, 3, 3, 3, 7, 9, 9])
    scale = torch.rand(len(src), generator=gen, dtype=torch.float64) + 0.5
    total = torch.zeros(10, dtype=torch.float64).index_add_(0, src, scale)
    if totals == "ones":
        scale = scale / total[src]
        total = torch.ones(10, dtype=torch.float64)
    parts, got, exact = splits.share_out(old, 1, src, scale, total)
    hit, slot = torch.unique(src, return_inverse=True)
    want = old.index_select(1, hit).to(torch.float64)
    want = want * splits.along(want, 1, total[hit])
    ref, ref_got = splits.split_columns(want.to(dtype), 1, slot, scale / total[src], torch.ones(len(src), dtype=torch.bool))
    sums = torch.zeros_like(want).index_add_(1, slot, ref.to(torch.float64))
    assert torch.equal(bits(parts), bits(ref)) and torch.equal(got, ref_got * total[src])
    assert exact == torch.equal(sums, want)
    assert exact or totals == "scaled"  # shares of a weight at total 1 sum to it exactly


def test_remap_reuses_an_answer_only_for_the_same_layout_and_channels():
    layout = Cat([CORE, Fixed(2, "x")])
    g = [0, 1, 2, 1]
    first = remap(layout, g, 3)
    assert remap(layout, list(g), 3)[0] is first[0]  # equal channel lists: the same answer
    g2 = [0, 1, 2, 2]
    assert remap(layout, g2, 3)[0].tolist() == [0, 1, 2, 2, 3, 4]
    assert remap(Cat([CORE, Fixed(2, "x")]), g, 3)[0].tolist() == first[0].tolist() == [0, 1, 2, 1, 3, 4]


def test_streamed_widen_restores_torch_threads_and_writes_what_memory_does(tmp_path):
    import transformers as T

    from conftest import dir_tensors
    from growcli.run.runner import Output, Source, Step, grow
    from growcli.run.steps import VerifySettings

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32, num_key_value_heads=1)
    src = tmp_path / "model"
    T.LlamaForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(str(src), max_shard_size="10KB")
    threads = torch.get_num_threads()
    runs = {}
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        runs[streaming] = grow(Source(src), [Step("widen", {"layer": "model.layers.*.mlp.up_proj", "to": 48})],
                               [Output(out, shard_size=20_000)], settings=VerifySettings(batches=1), streaming=streaming)
    assert torch.get_num_threads() == threads
    a, b = dir_tensors(tmp_path / "out-False"), dir_tensors(tmp_path / "out-True")
    assert sorted(a) == sorted(b) and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert runs[True]["execution"] == "streaming"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gather_copies_runs_and_padding_as_slices(dtype, dim, monkeypatch):
    """A map of a few runs and a long run of padding (hidden ×1.5: [0…d-1, -1 × d/2]) is copied as slices, along
    the first dimension too, never through a per-element gather; the copied positions equal index_select."""
    gen = torch.Generator().manual_seed(dim)
    old = torch.randn(6, 40, 5, generator=gen).to(dtype).movedim(1, dim).contiguous()
    old.view(-1)[::3] = float("nan")
    old.view(-1)[1::7] = -0.0
    n = old.shape[dim]
    idx = torch.tensor([*range(n), *range(3, 9), *range(0, 4), *[-1] * 70])  # 70 pads: one run, not 70
    monkeypatch.setattr(splits, "take", lambda *a: pytest.fail("a map of 4 runs went through take"))
    new = splits.gather(old, dim, idx)
    kept = torch.nonzero(idx >= 0).flatten()
    assert new.shape[dim] == len(idx)
    assert torch.equal(bits(new.index_select(dim, kept)), bits(old.index_select(dim, idx[kept])))


def test_gather_falls_back_to_take_past_the_run_limit():
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(4, 30, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, 30, (50,), generator=gen)
    idx[::4] = -1
    new = splits.gather(old, 1, idx, runs=8)
    kept = torch.nonzero(idx >= 0).flatten()
    assert torch.equal(bits(new.index_select(1, kept)), bits(old.index_select(1, idx[kept])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shares", ["halves", "asymmetric"])
@pytest.mark.parametrize("values", ["normal", "subnormal"])
def test_share_out_of_pairs_says_exact_exactly_when_the_float64_sums_agree(dtype, shares, values):
    """Every old position in two parts: share_out skips its float64 sum check, and must still say what it says."""
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(3, 8, generator=gen).to(dtype)
    if values == "subnormal":  # w/2 of the smallest subnormal rounds to 0: halves no longer sum to w
        tiny = torch.finfo(dtype).tiny
        old[0, :3] = torch.tensor([tiny * 2 ** -3, -tiny * 2 ** -5, tiny * 1.5]).to(dtype)
    src = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7])
    scale = torch.full((16,), 0.5, dtype=torch.float64)
    if shares == "asymmetric":
        scale = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
        scale = scale / torch.zeros(8, dtype=torch.float64).index_add_(0, src, scale)[src]
    total = torch.ones(8, dtype=torch.float64)
    parts, got, exact = splits.share_out(old, 1, src, scale, total)
    ref, ref_got = splits.split_columns(old, 1, src, scale, torch.ones(16, dtype=torch.bool))
    sums = torch.zeros(3, 8, dtype=torch.float64).index_add_(1, src, ref.to(torch.float64))
    assert torch.equal(bits(parts), bits(ref)) and torch.equal(got, ref_got)
    assert exact == torch.equal(sums, old.to(torch.float64))
    assert exact or (shares, values) == ("halves", "subnormal")


@pytest.mark.parametrize("dtype,parts,proved", [(torch.bfloat16, 3, True), (torch.bfloat16, 6, True),
                                                (torch.bfloat16, 7, False), (torch.float16, 4, True),
                                                (torch.float16, 5, False), (torch.float32, 3, False)])
@pytest.mark.parametrize("shares", ["random", "near one"])
def test_share_out_of_several_parts_skips_its_check_only_where_float64_sums_are_exact(dtype, parts, proved, shares):
    """k parts per weight: the float64 sum check is skipped when k·p + 1 ≤ 53 (p: significand bits), and what
    share_out says still equals the float64 sums. Shares near one leave remainders of a few ulps at every rank:
    the widest exponent spread the construction can make."""
    gen = torch.Generator().manual_seed(parts)
    old = (torch.randn(64, 8, generator=gen) * 4).to(dtype)
    src = torch.arange(8).repeat(parts)
    if shares == "random":
        scale = torch.rand(8 * parts, generator=gen, dtype=torch.float64) + 0.1
    else:  # each part takes all but 2^-p·(a random factor) of what is left
        eps = torch.finfo(dtype).eps * (torch.rand(8 * parts, generator=gen, dtype=torch.float64) + 0.5)
        scale = torch.cumprod(eps.view(parts, 8), 0).view(-1) / eps * (1 - eps)
    scale = scale / torch.zeros(8, dtype=torch.float64).index_add_(0, src, scale)[src]
    parts_, got, exact = splits.share_out(old, 1, src, scale, torch.ones(8, dtype=torch.float64))
    sums = torch.zeros(64, 8, dtype=torch.float64).index_add_(1, src, parts_.to(torch.float64))
    skipped = splits._parts_exact(old, src, got)  # shares that round to a power of two below 1: checked anyway
    assert skipped == proved if shares == "random" else skipped <= proved
    assert exact == torch.equal(sums, old.to(torch.float64))
    assert exact  # finite, normal values: the remainder construction always sums exactly
    assert bool((parts_.to(torch.float64) * old.index_select(1, src).to(torch.float64) >= 0).all())  # signs kept


@pytest.mark.parametrize("dim", [0, 1])
def test_put_of_runs_of_positions_equals_index_copy(dim):
    gen = torch.Generator().manual_seed(8)
    t = torch.randn(12, 14, generator=gen).to(torch.bfloat16)
    for pos in (torch.tensor([0, 1, 2, 6, 7, 11]), torch.tensor([3, 9])):
        v = torch.randn(*[len(pos) if d == dim else s for d, s in enumerate(t.shape)], generator=gen).to(t.dtype)
        a, b = t.clone(), t.clone()
        splits.put(a, dim, pos, v)
        b.index_copy_(dim, pos, v)
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dim", [0, 1])
def test_put_of_a_run_of_positions_equals_index_copy(dim):
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(9, 11, generator=gen).to(torch.bfloat16)
    fill = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16)
    fill |= 0x0015  # a NaN with a payload: copied as bits
    block = t.narrow(dim, 0, 4)
    values = fill.view(torch.bfloat16).view([1, 1]).expand_as(block)  # stride 0, as the padding fill is
    for pos in (torch.arange(5, 9), torch.tensor([2]), torch.tensor([1, 3, 4, 8])):
        a, b = t.clone(), t.clone()
        v = values.narrow(dim, 0, len(pos))
        splits.put(a, dim, pos, v)
        b.index_copy_(dim, pos, v.contiguous())
        assert torch.equal(bits(a), bits(b))


HIDDEN_LIKE = [  # (shape, dim, idx, scale, pad, split): maps of the hidden, heads and FFN steps
    ((37, 16), 1, [*range(16), *[-1] * 8], 1.0, "zero", True),
    ((16, 37), 0, [*range(16), *[-1] * 8], 1.0, "zero", False),
    ((37, 16), 1, [*range(16), *range(16)], 0.5, "zero", True),
    ((16, 37), 0, [*range(16), *range(0, 16, 2)], 1.0, "zero", False),
    ((37, 16), 1, [*range(16), *[-1] * 8], 0.8164965809277259, "zero", False),
]


@pytest.mark.parametrize("case", range(len(HIDDEN_LIKE)))
@pytest.mark.parametrize("values", ["finite", "nan"])
def test_sliced_rewrites_equal_the_whole_and_the_float64_reference(case, values):
    """apply_rewrite in slices (the map's tensors cached across them) equals the unsliced fast path and the
    float64 construction bit for bit, -0 and NaN included; a new map of the same length is not confused with it."""
    from growcli.run.width_stream import apply_rewrite
    from growcli.transforms import width_edit as we

    shape, dim, idx, scale, pad, split = HIDDEN_LIKE[case]
    gen = torch.Generator().manual_seed(case)
    old = torch.randn(shape, generator=gen).to(torch.bfloat16)
    old.view(-1)[::6] = -0.0
    if values == "nan":
        old.view(-1)[5] = float("nan")
    m = we.DimMap(dim, list(idx), [scale] * len(idx), pad, split=split)
    out = list(shape)
    out[dim] = len(idx)
    job = we.Rewrite("w", [m], 0.0, torch.Generator().get_state(), tuple(out), old.dtype, tuple(shape))
    whole, why = apply_rewrite(old, job, chunk=10 ** 9)
    sliced, why_sliced = apply_rewrite(old, job, chunk=64)
    ref, _, why_ref = we._rewrite_dim_float64(old, m, 0.0, torch.Generator())
    assert torch.equal(bits(sliced), bits(whole)) and torch.equal(bits(whole), bits(ref))
    assert why == why_sliced == why_ref
    other = we.DimMap(dim, list(reversed(idx)), [scale] * len(idx), pad, split=split)
    flipped, _, _ = we.rewrite(old, [other], 0.0, torch.Generator())
    assert torch.equal(bits(flipped), bits(we._rewrite_dim_float64(old, other, 0.0, torch.Generator())[0]))


def test_ahead_queues_small_tensors_within_its_budget_and_returns_each_its_own(monkeypatch):
    import threading

    from growcli.run import width_ahead

    monkeypatch.setattr(width_ahead, "AHEAD_BYTES", 3 * 100 * 2)  # three 100-element bf16 tensors
    release = threading.Event()
    started: list[int] = []

    class Item:
        def __init__(self, k: int, n: int):
            self.k, self.nbytes, self.ahead = k, 2 * n, None  # n bf16 elements

        def compute(self):
            started.append(self.k)
            release.wait(5)
            return [(torch.full((1,), float(self.k)), "")]

    items = [Item(0, 100), Item(1, 100), Item(2, 100), Item(3, 100), Item(4, 5000), Item(5, 100)]
    ahead = width_ahead.Ahead(items)
    try:
        assert sorted(ahead.pending) == sorted(id(i) for i in items[:3])  # the next one, then within the budget
        release.set()
        got = [float(ahead.take(i)[0][0]) for i in items[:2]]
        assert set(ahead.pending) == {id(items[2]), id(items[3])}  # the large one waits for room
        got += [float(ahead.take(i)[0][0]) for i in items[2:]]
        assert got == [0, 1, 2, 3, 4, 5] and started == [0, 1, 2, 3, 4, 5] and not ahead.pending
    finally:
        ahead.close()


def test_remap_of_the_channels_themselves_equals_the_generic_walk():
    from growcli.analysis.layouts import CORE, Cat
    gen = torch.Generator().manual_seed(4)
    g = channel_map(11, 19, 1, gen)
    idx, chan = remap(CORE, g, 11)
    want_idx, want_chan = remap(Cat([CORE]), g, 11)  # one part at offset 0: the generic key walk
    assert torch.equal(idx, want_idx) and torch.equal(chan, want_chan) and idx.tolist() == g


def test_aligned_padding_puts_most_copied_bytes_at_their_input_offset_within_a_page():
    from growcli.io.shards import PAGE, aligned_padding

    # 3 MB copied from input offset 8192+96 to data offset 0, 1 MB from 5000 to data offset 3 MB
    copies = [(0, 8288, 3 << 20), (3 << 20, 5000, 1 << 20)]
    for length in (57, 64, 4000, 4100):
        pad = aligned_padding(length, copies)
        assert (8 + length + pad) % 8 == 0 and 0 <= pad < PAGE
        assert (8 + length + pad + 0 - 8288) % PAGE == 0  # the larger range keeps its place in a page
        assert (8 + length + pad + (3 << 20) - 5000) % PAGE != 0
    assert aligned_padding(61, []) == 3  # nothing copied: only the 8-byte data start
    assert aligned_padding(61, [(0, 4096 + 3, 10)]) == 3  # no multiple-of-8 padding aligns an odd offset


def test_streamed_width_output_keeps_its_byte_copies_page_aligned_with_the_input(tmp_path):
    import json
    import struct

    import transformers as T

    from conftest import dir_tensors
    from growcli.io.shards import PAGE, read_tensors
    from growcli.run.runner import Output, Source, Step, grow
    from growcli.run.steps import VerifySettings

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32, num_key_value_heads=2)
    src = tmp_path / "model"
    T.LlamaForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(str(src))
    refs = read_tensors(src)
    out = tmp_path / "out"
    grow(Source(src), [Step("heads", {"to": 8})], [Output(out, shard_size=10 << 20)],
         settings=VerifySettings(batches=1), streaming=True)
    (shard,) = out.glob("*.safetensors")
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    copied = [k for k in header if k in refs and list(refs[k].shape) == header[k]["shape"] and "mlp" in k]
    assert len(copied) == 6  # gate, up and down of both blocks are byte copies under heads growth
    for k in copied:
        at = 8 + n + header[k]["data_offsets"][0]
        assert raw[at:at + refs[k].nbytes] == refs[k].file.read_bytes()[refs[k].start:refs[k].start + refs[k].nbytes]
        assert (at - refs[k].start) % PAGE == 0, k
    assert (8 + n) % 8 == 0
    grown = dir_tensors(out)
    assert grown["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)


def test_computed_tensors_are_written_in_small_pieces_with_every_byte(tmp_path, monkeypatch):
    import os

    from growcli.io import shards
    from growcli.run import upcycle_stream

    sizes = []
    real = os.write

    def spy(fd, data):
        sizes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(shards.os, "write", spy)
    t = torch.randn(3 * shards.WRITE_CHUNK // 4 + 7).to(torch.bfloat16)  # 1.5 chunks of bytes and an odd tail
    path = tmp_path / "t.bin"
    with open(path, "wb", buffering=0) as out:
        assert upcycle_stream._write_tensor(out, t) == t.nbytes
    assert max(sizes) == shards.WRITE_CHUNK and sum(sizes) == t.nbytes and len(sizes) == 2
    back = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.bfloat16)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_byte_copies_start_each_call_after_the_first_on_a_folio_of_the_input(tmp_path, monkeypatch):
    """copy_range copies up to the input's next 2 MB boundary first, then CHUNK at a time from folio boundaries
    (measured 25-30% faster than calls that all start inside a folio); every byte arrives, in order."""
    import os

    from growcli.io import shards

    data = os.urandom(3 * shards.FOLIO + 12345)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    calls = []
    real = os.copy_file_range

    def spy(a, b, count, offset_src=None, offset_dst=None):
        calls.append((offset_src, count))
        return real(a, b, count, offset_src, offset_dst)

    monkeypatch.setattr(shards.os, "copy_file_range", spy)
    monkeypatch.setattr(shards, "CHUNK", shards.FOLIO)
    start, n, seen = 4096 * 3 + 100, 2 * shards.FOLIO + 5000, []
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(tmp_path / "out.bin", "wb", buffering=0) as out:
            shards.copy_range(fd, out.fileno(), start, n, seen.append)
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == data[start:start + n] and sum(seen) == n
    assert calls[0] == (start, shards.FOLIO - start)
    assert all(o % shards.FOLIO == 0 for o, _ in calls[1:]) and len(calls) == 3


@pytest.mark.parametrize("min_copy", [64 << 10, 256])
def test_streamed_ffn_producers_copy_runs_of_their_rows_and_equal_the_in_memory_output(tmp_path, monkeypatch, min_copy):
    """FFN widen's up and gate projections are their old rows plus copies of some: runs of rows of at least
    MIN_COPY bytes are byte copies of the input (here, with MIN_COPY 256 bytes, the old rows and longer runs of
    picks), the rest gathered from disk; tensor for tensor what the in-memory path saves, run by run or not."""
    import json

    import transformers as T

    from conftest import dir_tensors
    from growcli.run import width_rows
    from growcli.run.runner import Output, Source, Step, grow
    from growcli.run.steps import VerifySettings
    from growcli.io.shards import TensorRef

    monkeypatch.setattr(width_rows, "MIN_COPY", min_copy)
    pieces: dict[tuple, list] = {}
    real = width_rows.row_pieces

    def spy(ref, rows):
        out = real(ref, rows)
        pieces[(str(ref.file), ref.start)] = out
        return out

    monkeypatch.setattr("growcli.run.width_stream.row_pieces", spy)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=40, max_position_embeddings=32, num_key_value_heads=1)
    src = tmp_path / "model"
    T.LlamaForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(str(src), max_shard_size="20KB")
    runs = {}
    for streaming in (False, True):
        runs[streaming] = grow(Source(src), [Step("widen", {"layer": "model.layers.*.mlp.up_proj", "to": 70})],
                               [Output(tmp_path / f"out-{streaming}", shard_size=30_000)],
                               settings=VerifySettings(batches=1), streaming=streaming)
    a, b = dir_tensors(tmp_path / "out-False"), dir_tensors(tmp_path / "out-True")
    assert sorted(a) == sorted(b) and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert len(pieces) == 4  # up and gate of both blocks
    kinds = [type(p).__name__ for ps in pieces.values() for p in ps]
    if min_copy == 256:  # 40 old rows of 128 bytes: one copy; picks in runs of 2 or more rows: copies too
        assert all(isinstance(ps[0], TensorRef) and ps[0].nbytes == 40 * 128 for ps in pieces.values())
    else:  # no run reaches 64 KB: one gather of all 70 rows each
        assert kinds == ["RowGather"] * 4
    assert sum(p.nbytes for ps in pieces.values() for p in ps) == 4 * 70 * 128
    assert "4 gathered from the input's rows" in json.dumps(runs[True])
