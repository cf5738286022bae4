import sys, torch
sys.path.insert(0, "bench")
from bench_pq_mma import random_pq, G, H, D
from bench_decode_attention import METHODS, random_token
from kvq_kernels.pq_decode import decode_attention_pq
from kvq_kernels.decode_token import decode_attention_token
from torch.profiler import profile, ProfilerActivity
flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
for name, make, fn in (("pq", lambda: random_pq(1, 131072, False), decode_attention_pq),
                       ("nf2", lambda: random_token(1, H, D, 131072, dict(METHODS["nf4"], bits=2)), decode_attention_token)):
    c = make()
    q = torch.randn(1, H * G, D, device="cuda", dtype=torch.float16)
    for _ in range(3):
        fn(q, c)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            flush.zero_()
            fn(q, c)
        torch.cuda.synchronize()
    print(name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
