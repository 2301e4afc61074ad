import torch

from hicra_rl.algo import logprobs_and_entropy


def _naive(logits, labels):
    logp_all = torch.log_softmax(logits.double(), -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def test_matches_naive_values_any_chunking():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 37) * 3
    labels = torch.randint(0, 37, (2, 5))
    ref_lp, ref_ent = _naive(logits, labels)
    for chunk in (1, 3, 4, 10, 1000):
        lp, ent = logprobs_and_entropy(logits, labels, chunk_size=chunk)
        assert lp.shape == (2, 5) and lp.dtype == torch.float32
        assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
        assert torch.allclose(ent.double(), ref_ent, atol=1e-5)


def test_uniform_logits_entropy_is_log_vocab():
    lp, ent = logprobs_and_entropy(torch.zeros(3, 8), torch.tensor([0, 3, 7]), chunk_size=2)
    assert torch.allclose(ent, torch.full((3,), torch.log(torch.tensor(8.0))))
    assert torch.allclose(lp, torch.full((3,), -torch.log(torch.tensor(8.0))))


def test_gradient_matches_autograd_through_naive():
    torch.manual_seed(1)
    logits = (torch.randn(7, 11, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, 11, (7,))
    w_lp, w_ent = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    lp, ent = logprobs_and_entropy(logits, labels, chunk_size=3)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    got = logits.grad.clone()
    logits.grad = None
    ref_lp, ref_ent = _naive(logits, labels)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()
    assert torch.allclose(got, logits.grad, atol=1e-5)


def test_gradient_of_one_output_alone_matches_autograd():
    """A loss of the log-probs only (the policy term) or of the entropy only: the backward skips the other
    output's term (no materialised zero gradient) and still gives autograd's gradient."""
    torch.manual_seed(2)
    labels = torch.randint(0, 11, (7,))
    w = torch.randn(7, dtype=torch.float64)
    for which in (0, 1):
        logits = (torch.randn(7, 11, dtype=torch.float64) * 2).requires_grad_()
        (logprobs_and_entropy(logits, labels, chunk_size=3)[which] * w).sum().backward()
        got = logits.grad.clone()
        logits.grad = None
        (_naive(logits, labels)[which] * w).sum().backward()
        assert torch.allclose(got, logits.grad, atol=1e-6), which


def test_bf16_logits_keep_their_dtype_for_grad_and_get_the_fp32_gradient_rounded():
    torch.manual_seed(3)
    logits = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([1, 2, 3, 4])
    lp, ent = logprobs_and_entropy(logits, labels, chunk_size=3)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = _naive(ref, labels)
    (ref_lp.sum() + ref_ent.sum()).backward()
    assert torch.allclose(logits.grad.double(), ref.grad, rtol=1e-2, atol=1e-3)


def test_auto_chunk_rows_fits_two_mib_on_cpu_and_is_1024_on_gpu():
    from hicra_rl.algo.logprobs import auto_chunk_rows

    assert auto_chunk_rows(49152, "cpu") == 10        # 2 MiB / (4 B x 49152) = 10.67
    assert auto_chunk_rows(151936, "cpu") == 3        # Qwen's vocabulary: 3.45
    assert auto_chunk_rows(2_000_000, "cpu") == 2     # never below 2 rows
    assert auto_chunk_rows(49152, torch.device("cuda")) == 1024


def test_auto_chunk_size_gives_the_same_values_and_gradient():
    torch.manual_seed(3)
    logits = (torch.randn(25, 300_000 // 1000) * 2).requires_grad_()   # 300-word vocabulary: 1747 rows per chunk
    big = (torch.randn(23, 200_000) * 2).requires_grad_()               # 2 rows per chunk: 12 chunks
    for x in (logits, big):
        labels = torch.randint(0, x.shape[-1], (x.shape[0],))
        lp, ent = logprobs_and_entropy(x, labels)                       # auto
        (lp.sum() + ent.sum()).backward()
        got = x.grad.clone()
        x.grad = None
        ref_lp, ref_ent = _naive(x, labels)
        assert torch.allclose(lp.double(), ref_lp, atol=1e-4) and torch.allclose(ent.double(), ref_ent, atol=1e-4)
        (ref_lp.sum() + ref_ent.sum()).backward()
        assert torch.allclose(got, x.grad, atol=1e-5)
