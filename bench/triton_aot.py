"""Compile the Triton kernels ahead of time for Hopper (sm_90) without a GPU and report ptxas registers/spills.

    python bench/triton_aot.py            # table of every shipped kernel configuration
    python bench/triton_aot.py --json     # machine-readable

Runs on a CPU-only machine: Triton builds PTX for GPUTarget("cuda", 90, 32) and the ptxas shipped in its wheel
(or the one on PATH) assembles it for sm_90a with -v. Must run WITHOUT TRITON_INTERPRET=1 (the flag turns
@triton.jit functions into interpreted ones at import). Exit status 1 if any configuration fails to compile or
spills registers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SPLIT_N_SIG = {
    "Q": "*fp32",
    "X": "*u8",
    "COEF": "*fp32",
    "XLAB": "*i32",
    "QLAB": "*i32",
    "M": "*fp32",
    "L": "*fp32",
    "L2": "*fp32",
    "O": "*fp32",
    "TOPK": "*i64",
    "B": "i32",
    "N": "i32",
    "D": "i32",
    "keys_per_split": "i32",
    "scale": "fp32",
    "shift": "fp32",
    "stride_q": "i32",
    "stride_x": "i32",
    "stride_os": "i32",
    "stride_ob": "i32",
}
LOGITS_SIG = {
    "QHI": "*fp32",
    "QLO": "*fp32",
    "X": "*u8",
    "A2": "*fp32",
    "KN": "*fp32",
    "K2": "*fp32",
    "XLAB": "*i32",
    "QLAB": "*i32",
    "LOGITS": "*fp32",
    "TM": "*fp32",
    "TL": "*fp32",
    "TL2": "*fp32",
    "B": "i32",
    "N": "i32",
    "D": "i32",
    "stride_q": "i32",
    "stride_x": "i32",
    "stride_lb": "i32",
    "stride_tb": "i32",
}
PATCH_SIG = {
    "Q": "*fp32",
    "IMG": "*u8",
    "IMGIDX": "*i32",
    "POS": "*i32",
    "COEF": "*fp32",
    "M": "*fp32",
    "L": "*fp32",
    "L2": "*fp32",
    "O": "*fp32",
    "n_rows": "i32",
    "n_img": "i32",
    "n_pos": "i32",
    "imgs_per_split": "i32",
    "H": "i32",
    "W": "i32",
    "scale": "fp32",
    "shift": "fp32",
    "stride_q": "i32",
    "SKIP": "fp32",
}
SAME_POS_SIG = {
    "Q": "*fp32",
    "IMG": "*u8",
    "IMGIDX": "*i32",
    "POS": "*i32",
    "COEF": "*fp32",
    "M": "*fp32",
    "L": "*fp32",
    "L2": "*fp32",
    "O": "*fp32",
    "n_rows": "i32",
    "n_img": "i32",
    "imgs_per_split": "i32",
    "H": "i32",
    "W": "i32",
    "scale": "fp32",
    "shift": "fp32",
    "stride_q": "i32",
}
COORD_SIG = {
    "X": "*fp32",
    "IMG": "*u8",
    "SUPP": "*i32",
    "VIDX": "*i32",
    "COEF": "*fp32",
    "SPLITS": "*i32",
    "XLAB": "*i64",
    "QLAB": "*i64",
    "M": "*fp32",
    "L": "*fp32",
    "O": "*fp32",
    "B": "i32",
    "D": "i32",
    "nnz": "i32",
    "scale": "fp32",
    "shift": "fp32",
}
WSUM_SIG = {
    "LOGITS": "*fp32",
    "MROW": "*fp32",
    "X": "*u8",
    "O": "*fp32",
    "B": "i32",
    "N": "i32",
    "D": "i32",
    "keys_per_split": "i32",
    "stride_lb": "i32",
    "stride_x": "i32",
    "stride_os": "i32",
    "stride_ob": "i32",
}


def configurations():
    """(name, kernel attribute, signature, constexprs, num_warps) of every configuration the backend launches."""
    from analytic_diffusion.kernels import global_retrieval as g
    from analytic_diffusion.kernels import patch_retrieval as pr

    out = []
    for keys in ("u8", "fp32"):
        for labels in (False, True):
            sig = dict(SPLIT_N_SIG, X=f"*{keys}")
            out.append(
                (
                    f"split_n softmax x={keys} labels={labels}",
                    g._split_n_kernel,
                    sig,
                    dict(BLOCK_B=4, BLOCK_N=16, BLOCK_D=64, HAS_LABELS=labels, SOFTMAX=True, TOPK_K=0),
                    4,
                )
            )
    for k in (2, 64):
        out.append(
            (
                f"split_n top-{k} x=u8",
                g._split_n_kernel,
                SPLIT_N_SIG,
                dict(BLOCK_B=4, BLOCK_N=max(16, k), BLOCK_D=64, HAS_LABELS=False, SOFTMAX=False, TOPK_K=k),
                g.split_n_warps(k),
            )
        )
    for kind, code in g.PRECISIONS.items():
        bb, bn, bk, bd, warps = g.TWO_PASS_CONFIG_GPU[kind]
        for keys in ("u8", "fp32") if kind != "bf16x2" else ("u8",):
            out.append(
                (
                    f"two_pass logits {kind} x={keys}",
                    g._logits_kernel,
                    dict(LOGITS_SIG, X=f"*{keys}"),
                    dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, PRECISION=code, HAS_LABELS=False, INTERP=False),
                    warps,
                )
            )
            out.append(
                (
                    f"two_pass weighted-sum {kind} x={keys}",
                    g._weighted_sum_kernel,
                    dict(WSUM_SIG, X=f"*{keys}"),
                    dict(BLOCK_B=bb, BLOCK_N=bk, BLOCK_D=bd, PRECISION=code, INTERP=False),
                    warps,
                )
            )
    bq, bp, bf = pr.BLOCKS
    for c in (1, 3):
        for k in (3, 5, 7, 11, 15):
            out.append(
                (
                    f"patch (ELS/bbELS) C={c} k={k} x=u8",
                    pr._patch_kernel,
                    PATCH_SIG,
                    dict(K=k, C=c, C_PAD=max(2, 1 << (c - 1).bit_length()), BLOCK_Q=bq, BLOCK_P=bp, BLOCK_F=bf),
                    4,
                )
            )
    sq, sn, sf = pr.SAME_POSITION_BLOCKS
    for whole, label, ks in (
        (False, "same-position (LS)", (3, 7, 15)),
        (True, "same-position crops (PSPC)", (3, 5, 8, 15, 32)),
    ):
        for c in (1, 3):
            for k in ks:
                out.append(
                    (
                        f"{label} C={c} k={k} x=u8",
                        pr._same_position_kernel,
                        SAME_POS_SIG,
                        dict(
                            K=k,
                            C=c,
                            C_PAD=max(2, 1 << (c - 1).bit_length()),
                            WHOLE=whole,
                            BLOCK_Q=sq,
                            BLOCK_N=sn,
                            BLOCK_F=sf,
                        ),
                        pr.same_position_warps(c * k * k, whole),
                    )
                )
    from analytic_diffusion.kernels import coordinate_retrieval as cr

    bm, bn = cr.BLOCKS
    for keys in ("u8", "fp32"):
        for labels in (False, True):
            out.append(
                (
                    f"coordinate (pca_locality) x={keys} labels={labels}",
                    cr._coordinate_kernel,
                    dict(COORD_SIG, IMG=f"*{keys}"),
                    dict(HAS_LABELS=labels, BLOCK_M=bm, BLOCK_N=bn),
                    4,
                )
            )
    return out


def ptxas_path() -> str:
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(shipped):
        return shipped
    found = shutil.which("ptxas")
    if not found:
        raise RuntimeError("no ptxas: neither Triton's wheel nor PATH has one")
    return found


def compile_all():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real @triton.jit")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = ptxas_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, sig, consts, warps in configurations():
            row = {"kernel": name, "num_warps": warps}
            try:
                k = triton.compile(
                    ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
                )
                path = os.path.join(tmp, "k.ptx")
                with open(path, "w") as f:
                    f.write(k.asm["ptx"])
                r = subprocess.run(
                    [ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True
                )
                text = r.stdout + r.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                row.update(
                    ok=r.returncode == 0,
                    registers=int(regs.group(1)) if regs else None,
                    spill_stores=int(spill.group(1)) if spill else None,
                    spill_loads=int(spill.group(2)) if spill else None,
                    shared=int(k.metadata.shared),
                    ptxas=None if r.returncode == 0 else text[-400:],
                )
            except Exception as exc:  # report, do not hide: the caller fails on ok=False
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = compile_all()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'kernel':48s} {'warps':>5s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>7s}")
        for r in rows:
            if r["ok"]:
                print(
                    f"{r['kernel']:48s} {r['num_warps']:5d} {r['registers']:5d} "
                    f"{r['spill_stores']:5d}/{r['spill_loads']:<6d} {r['shared']:7d}"
                )
            else:
                print(f"{r['kernel']:48s} FAILED: {r.get('error') or r.get('ptxas')}")
    bad = [r for r in rows if not r["ok"] or r.get("spill_stores") or r.get("spill_loads")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
