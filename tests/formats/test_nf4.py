import torch

from lighten.formats import get
from lighten.formats.elements import NF4_CODE_BOOK
from lighten.formats.packing import unpack_bits

# bitsandbytes' NF4 table, as published (QLoRA, Dettmers et al. 2023)
PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933235474, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_code_book_is_the_published_one():
    assert NF4_CODE_BOOK.dtype == torch.float32
    assert NF4_CODE_BOOK.tolist() == torch.tensor(PUBLISHED).tolist()


def test_code_book_values_times_absmax_are_exact():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4, 192), generator=g)
    idx[:, ::64] = 15  # every block of 64 holds +1, so its absmax is the row's multiplier
    absmax = torch.tensor([[3.5], [0.01], [1e3], [1.0]])
    x = torch.tensor(PUBLISHED)[idx] * absmax
    q = get("nf4").quantize(x)
    assert q.spec == "nf4:g64" and q.tensors["scales"].dtype == torch.float32
    assert torch.equal(q.tensors["scales"], absmax.expand(4, 3))
    assert torch.equal(unpack_bits(q.tensors["codes"], 4, x.numel()).view(4, 192), idx.to(torch.uint8))
    assert torch.equal(q.dequantize(), x)


def test_double_quantization():
    fmt = get("nf4:dq")
    assert fmt.name == "nf4:g64:dq"
    assert abs(fmt.bits_per_element - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-12  # 4.127
    x = torch.randn(40, 1024) * torch.rand(40, 1)  # 640 absmaxes -> 3 blocks of 256
    q = fmt.quantize(x)
    t = q.tensors
    assert (
        t["scales"].shape == (40, 16) and t["scales_scale"].shape == (3,) and t["scales_mean"].shape == (1,)
    )
    true_absmax = x.abs().view(40, 16, 64).amax(-1)
    assert abs(t["scales_mean"].item() - true_absmax.mean().item()) < 1e-6
    # the documented decode: absmax = int8 code * block scale + mean, never below the true one
    codes = t["scales"].view(torch.int8).float().view(-1)
    absmax = (codes * t["scales_scale"].repeat_interleave(256)[:640] + t["scales_mean"]).view(40, 16)
    assert (absmax >= true_absmax * (1 - 1e-6)).all()
    assert (absmax - true_absmax).max() <= t["scales_scale"].max() * (1 + 1e-5)
    # each element decodes to the code-book entry (times the decoded absmax) nearest to it
    a = absmax.repeat_interleave(64, 1)[..., None]
    nearest = (x[..., None] - torch.tensor(PUBLISHED) * a).abs().min(-1).values
    assert ((q.dequantize() - x).abs() <= nearest + 1e-6).all()
