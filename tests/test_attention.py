"""kvmart's segmented attention kernel (kvmart/runtime/attention.py) and its workspace.

The kernel was rewritten to run without per-layer allocation (scores written side by side into one reused float32
matrix, scaled and softmaxed in place, no concatenation). Stored caches were computed by the previous kernel, and
reusing them must stay bit-exact with a run from scratch, so the new kernel must compute the very same bits:
`reference_attention` is that kernel, verbatim, and the tests compare against it with torch.equal."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kvmart.runtime.attention import grouped_attention, reference_attention
from kvmart.runtime.workspace import Workspace

DTYPES = (torch.float32, torch.bfloat16)


def make_case(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, q_len: int, new_len: int,
              segment_lengths: Sequence[int], seed: int = 0, buffer_tokens: int = 0):
    """Random query, prefix segments and new-token segment. With `buffer_tokens`, the new segment is a view of a
    larger buffer (as in a decode step's WorkingCache), not a contiguous tensor."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    segments = [(randn(1, kv_heads, n, head_dim), randn(1, kv_heads, n, head_dim)) for n in segment_lengths]
    capacity = max(buffer_tokens, new_len)
    key, value = randn(1, kv_heads, capacity, head_dim)[:, :, :new_len], randn(1, kv_heads, capacity, head_dim)[:, :, :new_len]
    query = randn(1, q_len, heads, head_dim).transpose(1, 2)  # transformers hands queries over transposed
    return query, segments, key, value, head_dim ** -0.5


CASES = [  # heads, kv_heads, head_dim, q_len, new_len, segment lengths
    (16, 8, 128, 32, 32, (256,) * 4 + (190,)),  # Qwen3-0.6B's shape: a question after a chunked document
    (16, 8, 128, 1, 7, (256, 33)),  # a decode step
    (9, 3, 64, 24, 24, (256, 256)),  # SmolLM2's shape
    (9, 3, 64, 1, 1, (256,)),
    # no grouping, one query row: with two threads, MKL's route for a single row into a strided output rounds
    # otherwise (why the kernel multiplies into a contiguous block before copying into the score matrix)
    (4, 4, 64, 1, 4, (190, 256, 256)),
    (4, 4, 128, 1, 1, (33, 190, 256)),
    (2, 1, 8, 3, 5, (5, 7)),  # tiny: below BLAS's threshold, torch's own loops
    (4, 2, 16, 6, 6, ()),  # nothing cached: only the new segment, causally masked
]


@pytest.fixture(params=["1-thread", "default-threads"])
def threads(request, default_threads):
    """BLAS takes other routes with more threads (a single row is split between them): check under both."""
    torch.set_num_threads(1 if request.param == "1-thread" else default_threads)
    yield
    torch.set_num_threads(1)  # what conftest sets for the fast tests


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"h{c[0]}kv{c[1]}d{c[2]}q{c[3]}s{len(c[5])}" for c in CASES])
def test_the_kernel_computes_the_previous_kernels_bits(dtype, case, threads):
    query, segments, key, value, scale = make_case(dtype, *case)
    expected = reference_attention(query, segments, key, value, scale)
    assert torch.equal(grouped_attention(query, segments, key, value, scale, Workspace()), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_a_decode_step_over_a_buffer_view_computes_the_same_bits(dtype):
    query, segments, key, value, scale = make_case(dtype, 16, 8, 128, 1, 9, (256, 100), buffer_tokens=64)
    assert not key.is_contiguous()
    assert torch.equal(grouped_attention(query, segments, key, value, scale, Workspace()),
                       reference_attention(query, segments, key, value, scale))


def poison(workspace: Workspace) -> None:
    """Fill every buffer with NaN: a kernel that read scratch memory before writing it would return NaN."""
    for buffer in workspace._buffers.values():
        buffer.view(torch.uint8).fill_(0xFF)  # all-ones bytes: NaN in float32 and bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_a_reused_workspace_changes_nothing_and_grows_no_more(dtype):
    workspace = Workspace()
    big = make_case(dtype, 16, 8, 128, 32, 32, (256, 256, 190), seed=1)
    small = make_case(dtype, 16, 8, 128, 1, 3, (256,), seed=2)
    first = grouped_attention(*big, workspace).clone()
    grown = workspace.grown
    poison(workspace)
    assert torch.equal(grouped_attention(*small, workspace), reference_attention(*small))
    poison(workspace)
    assert torch.equal(grouped_attention(*big, workspace), first)
    assert workspace.grown == grown  # the hot path allocated nothing new


def test_a_workspace_hands_out_views_of_kept_buffers_and_trims_large_ones():
    workspace = Workspace(keep_bytes=1 << 20)
    a = workspace.take("scores", (4, 8, 16), torch.float32)
    b = workspace.take("scores", (2, 8, 16), torch.float32)
    assert a.is_contiguous() and b.shape == (2, 8, 16) and b.data_ptr() == a.data_ptr() and workspace.grown == 1
    workspace.take("scores", (1 << 20,), torch.float32)  # 4 MB: past keep_bytes
    workspace.take("out", (16,), torch.bfloat16)
    assert workspace.grown == 3 and workspace.nbytes > 1 << 22
    workspace.trim()
    assert workspace.nbytes < 1 << 20  # the large buffer is gone, the small one kept
    workspace.take("out", (8,), torch.bfloat16)
    assert workspace.grown == 3


def test_the_model_reuses_its_threads_workspace_between_forward_passes(model_f32):
    ids = model_f32.tokenize("a document long enough to be cut into two pieces " * 20)
    prefix = model_f32.prefill_pieces([ids[:64], ids[64:]])
    question = ids[:9]
    first = model_f32.continue_from(prefix, question, all_logits=True).logits
    grown = model_f32.workspace().grown
    again = model_f32.continue_from(prefix, question, all_logits=True).logits
    assert torch.equal(first, again) and model_f32.workspace().grown == grown
