"""GPU check of the deployment path: generate with CUDA graphs equals eager generate equals the dense oracle.

Run on a CUDA machine: ``python scripts/gpu_check.py``. Prints one line per case and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from duoattn import HeadPattern, duo_attention
from duoattn.kernels.reference import reference_attention

SINK, RECENT = 16, 64


def main() -> int:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).cuda().float().eval()
    gates = np.random.default_rng(0).random((4, 4))
    pattern = HeadPattern(gates, sink=SINK, recent=RECENT)
    roles = pattern.binarize(sparsity=0.5)

    def oracle(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        ret = torch.tensor(roles[module.layer_idx])
        return reference_attention(q, k, v, ret, SINK, RECENT, scale=scaling).transpose(1, 2), None

    AttentionInterface.register("oracle", oracle)
    AttentionMaskInterface.register("oracle", sdpa_mask)
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    new = 24
    model.set_attn_implementation("oracle")
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        ref_logits = model(ids, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    failures = 0
    for kv_bits in (16, 8, 4):
        outs = {}
        for graphs in (True, False):
            with duo_attention(model, pattern, sparsity=0.5, prefill_chunk_size=256, kv_bits=kv_bits,
                               cuda_graphs=graphs) as h:
                out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
                outs[graphs] = out
                cache = out.past_key_values
                logits = model(ids).logits
                captured = len(h.graphs.steps) > 0 or cache in h.graphs.steps
                print(f"kv{kv_bits} graphs={graphs} decode={cache.describe()['decode_kernel']} captured={captured} "
                      f"failed={h.graphs.failed} prefill max|dlogit| vs oracle="
                      f"{(logits - ref_logits).abs().max().item():.2e}")
        same = torch.equal(outs[True].sequences, outs[False].sequences)
        dl = max((a - b).abs().max().item() for a, b in zip(outs[True].logits, outs[False].logits))
        match_ref = (outs[True].sequences == seq).float().mean().item()
        print(f"kv{kv_bits}: graph == eager tokens: {same}; max |dlogit| graph vs eager {dl:.2e}; "
              f"token agreement with oracle {match_ref:.3f}")
        if not same or dl > 1e-3 or (kv_bits == 16 and match_ref < 1.0):
            failures += 1
    failures += kernel_check()
    print("FAILURES", failures)
    return 1 if failures else 0


def kernel_check() -> int:
    """The quantised split-KV decode kernel in bf16 against SDPA over the dequantised cache, at 64K tokens."""
    import torch.nn.functional as F

    from duoattn.kernels import decode_triton as dt
    from duoattn.quant.kv import KVQuantConfig, dequantize, quantize

    failures = 0
    torch.manual_seed(0)
    b, g, d, t, n_ret, n_str, cap = 1, 4, 128, 65536, 2, 6, 320
    for bits in (8, 4):
        for group in (None, 32):
            cfg = KVQuantConfig(bits, group)
            kf = torch.randn(b, n_ret, t, d, device="cuda", dtype=torch.bfloat16)
            vf = torch.randn_like(kf)
            qk, qv = quantize(kf, cfg), quantize(vf, cfg)
            rk = torch.randn(b, n_str, cap, d, device="cuda", dtype=torch.bfloat16)
            rv = torch.randn_like(rk)
            q = torch.randn(b, (n_ret + n_str) * g, 1, d, device="cuda", dtype=torch.bfloat16)
            clock = torch.tensor(t - 7, device="cuda")
            splits = 64
            out = torch.empty(b, 1, (n_ret + n_str) * g, d, device="cuda", dtype=torch.bfloat16)
            po = torch.empty(b, n_ret * g, splits, d, device="cuda")
            pl = torch.empty(b, n_ret * g, splits, device="cuda")
            dt.decode_attention_quant(q, qk, qv, rk, rv, clock, out, po, pl, d**-0.5, splits)
            k_ref = dequantize(qk)[:, :, : t - 7]
            v_ref = dequantize(qv)[:, :, : t - 7]
            ref_r = F.scaled_dot_product_attention(q[:, : n_ret * g].float(), k_ref, v_ref, enable_gqa=True)
            ref_s = F.scaled_dot_product_attention(q[:, n_ret * g :].float(), rk.float(), rv.float(), enable_gqa=True)
            ref = torch.cat([ref_r, ref_s], 1).transpose(1, 2)
            err = (out.float() - ref).abs().max().item()
            print(f"quantised decode kernel int{bits} group={group or d}: max |err| vs dequantised SDPA {err:.2e}")
            failures += err > 2e-2
    return failures


if __name__ == "__main__":
    sys.exit(main())
