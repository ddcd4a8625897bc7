"""FSDP on CPU (gloo, 2 processes): rank-synchronous scoring of a sharded encoder.

Lightning's FSDPStrategy needs a GPU, but both of torch's FSDPs run on CPU over gloo: FSDP2
(``fully_shard`` on a CPU DeviceMesh) and FSDP1 (``FullyShardedDataParallel(device_id=cpu)``, what
Lightning's FSDPStrategy wraps). Every forward and every backward pass of a sharded block
all-gathers its parameters from both ranks, so the two ranks must run the same passes. Here each
rank scores a different number of rows (5 and 2, 0 and 3, 2 and 5) through ``SynchronousScorer``:
nothing hangs (a hard timeout turns a hang into a failure), every sharded block runs the same
forward passes (same row counts) and the same backward passes on both ranks, and the scores equal
a float64 brute force on the unsharded model.

The wrapper's default rows are replicated (``vectorize`` None/"auto" become "replicated"): per
micro-batch of b rows, one plain forward for z, then ceil(K/w) forward passes over the b·w
replicated rows, one backward each (w = min(K, 16) on CPU; here K = w = 3: one of each). Explicit loop
(``vectorize=0``) and batched rows (``vectorize=2``) are kept and work under FSDP2. Under FSDP1 only
replicated rows (or one vmapped backward of all K rows) work: FSDP1 frees the gathered parameters
after a backward pass, so a second backward on the retained graph of the loop or of batched rows
with w < K fails (``setStorage: ... out of bounds for storage of size 0``). FSDP1 is covered with
nested wrapping and ``use_orig_params=True`` (Lightning's default), flat ``use_orig_params=False``,
and a memory budget that makes every micro-batch recompute its rows group by group (6 fresh
forward + backward passes of one row each). ``Scorer.embed`` (one forward under ``torch.no_grad``)
works under both, with 4 rows on one rank and 0 on the other.

The same scorer without the wrapper, counted on an unsharded replica (so that nothing can hang),
runs different passes per rank: under FSDP a rank then waits in an all-gather the other never joins
(or, when the totals happen to match, collectives of unrelated passes are paired with each other).
After scoring, both FSDPs still train: one step's gradient (FSDP2) or updated parameters (FSDP1)
equal the replica's.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from jepa_monitor import jacobian

SCRIPT = textwrap.dedent(
    """
    import copy, datetime, json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor import DTensor
    from jepa_monitor import Scorer
    from jepa_monitor.callbacks._synchronous import SynchronousScorer

    out_dir = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A collective that the other rank never reaches fails after 60 s instead of waiting forever.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)
    replica = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))   # unsharded, for counting only
    model = copy.deepcopy(replica)   # FSDP2, nested
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    shards = {name: [tuple(p.shape), tuple(p.to_local().shape), isinstance(p, DTensor)]
              for name, p in model.named_parameters()}
    cpu = torch.device("cpu")
    # FSDP1 as Lightning's FSDPStrategy wraps it: nested (one unit per Linear) with use_orig_params=True,
    # and one flat unit with use_orig_params=False.
    fsdp1 = FSDP1(copy.deepcopy(replica), device_id=cpu, use_orig_params=True,
                  auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
    fsdp1_flat = FSDP1(copy.deepcopy(replica), device_id=cpu, use_orig_params=False)
    # Local parameter elements per rank (FSDP1 keeps flat shards: 1-D views, or the flat parameter).
    fsdp1_local = {"fsdp1": sum(p.numel() for p in fsdp1.parameters()),
                   "fsdp1_flat": sum(p.numel() for p in fsdp1_flat.parameters())}
    fsdp1_units = {"fsdp1": len(FSDP1.fsdp_modules(fsdp1)), "fsdp1_flat": len(FSDP1.fsdp_modules(fsdp1_flat))}

    def linears(m):
        inner = m.module if isinstance(m, FSDP1) else m
        return {i: getattr(inner[i], "module", inner[i]) for i in (0, 2)}   # under an FSDP1 unit, if any

    def counting(blocks):
        # Per block: the rows of every forward pass (each one all-gathers the block's shard under
        # FSDP) and the backward passes through it (each one all-gathers it again).
        counts = {i: {"forward_rows": [], "backward": 0} for i in blocks}

        def pre_hook(i):
            def hook(module, args):
                counts[i]["forward_rows"].append(int(args[0].shape[0]))
            return hook

        def out_hook(i):
            def hook(module, args, out):
                if out.requires_grad:
                    def on_grad(grad):
                        counts[i]["backward"] += 1
                    out.register_hook(on_grad)
            return hook

        for i, block in blocks.items():
            block.register_forward_pre_hook(pre_hook(i))
            block.register_forward_hook(out_hook(i))

        def take():
            snapshot = json.loads(json.dumps(counts))
            for c in counts.values():
                c["forward_rows"].clear()
                c["backward"] = 0
            return snapshot

        return take

    models = {"fsdp2": model, "fsdp1": fsdp1, "fsdp1_flat": fsdp1_flat}
    take = {name: counting(linears(m)) for name, m in models.items()}
    take_replica = counting(linears(replica))

    filler = (torch.randn(1, 5, generator=torch.Generator().manual_seed(99)), {})
    cases = {  # name: (model, rows on rank 0, rows on rank 1, Scorer options)
        "five_two": ("fsdp2", 5, 2, {"batch_size": 2}),   # default: replicated rows
        "zero_three": ("fsdp2", 0, 3, {"batch_size": 2}),
        "five_two_loop": ("fsdp2", 5, 2, {"batch_size": 2, "vectorize": 0}),
        "two_five_batched": ("fsdp2", 2, 5, {"batch_size": None, "vectorize": 2}),
        "fsdp1_five_two": ("fsdp1", 5, 2, {"batch_size": 2}),
        "fsdp1_zero_three": ("fsdp1", 0, 3, {"batch_size": None}),
        "fsdp1_budget": ("fsdp1", 5, 2, {"batch_size": 2, "memory_bytes": 160}),
        "fsdp1_flat_five_two": ("fsdp1_flat", 5, 2, {"batch_size": 2}),
    }
    results = {"shards": shards, "fsdp1_local": fsdp1_local, "fsdp1_units": fsdp1_units, "cases": {}, "embed": {}}
    for name, (which, n0, n1, options) in cases.items():
        n = (n0, n1)[rank]
        x = torch.randn(n, 5, generator=torch.Generator().manual_seed(1000 * len(name) + rank))
        scorer = SynchronousScorer(Scorer(models[which], **options), world, filler)
        scores = scorer.score(x)
        sharded = take[which]()
        scorer.scorer.replace(encoder=replica).score(x)   # the same options, no wrapper: counted only
        unsynchronised = take_replica()
        results["cases"][name] = {
            "model": which, "vectorize": scorer.scorer.vectorize, "x": x.tolist(),
            "jepa_score": scores.jepa_score.tolist(), "embedding": scores.embedding.tolist(),
            "sharded": sharded, "unsynchronised": unsynchronised,
        }

    # Scorer.embed: one gradient-free forward per call, 4 rows on rank 0 and none on rank 1.
    xe = torch.randn((4, 0)[rank], 5, generator=torch.Generator().manual_seed(5))
    for which, m in models.items():
        with torch.no_grad():
            e = SynchronousScorer(Scorer(m), world, filler).embed(xe)
        results["embed"][which] = {"x": xe.tolist(), "embedding": e.tolist(), "sharded": take[which]()}

    # Input-only backward passes leave FSDP able to train: one step's gradient (FSDP2) or SGD update
    # (FSDP1, gathered through its full state dict) equals the replica's.
    xt = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))   # the same rows on both ranks
    model.train()
    model(xt).pow(2).mean().backward()
    results["grads"] = {name: p.grad.full_tensor().tolist() for name, p in model.named_parameters()}
    results["shards_after"] = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    results["stepped"] = {}
    for which in ("fsdp1", "fsdp1_flat"):
        m = models[which]
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(xt).pow(2).mean().backward()
        opt.step()
        results["stepped"][which] = {k: v.tolist() for k, v in m.state_dict().items()}

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(tmp_path, timeout: float = 120.0):
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [proc.communicate()[0][-4000:] for proc in procs]
        raise AssertionError(f"the two FSDP ranks did not finish within {timeout:.0f} s (a hang?):\n" + "\n".join(tails))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{out[-8000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _reference(x: torch.Tensor):
    """float64 brute force on the unsharded model: J per sample, 0.5 logdet(J Jᵀ) (K = 3 <= D = 5)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    scores = []
    for xi in x.double():
        jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).reshape(-1), xi)
        scores.append(0.5 * torch.logdet(jac @ jac.T))
    with torch.no_grad():
        z = model(x.double())
    return torch.stack(scores) if scores else torch.empty(0, dtype=torch.float64), z


def _replicated_passes(micro_batches, k_dim: int = 3, width: int = 3):
    """Forward row counts and backward passes of replicated rows (jacobian._vjp_rows_replicated):
    per micro-batch of b rows, the plain forward for z (b rows), then ceil(K/w) forward passes over
    b·w' rows (w' = w, the last one the rest of K) with one backward each. On CPU w = min(K, 16)."""
    rows, backward = [], 0
    for b in micro_batches:
        rows.append(b)
        for i0 in range(0, k_dim, width):
            rows.append(b * min(width, k_dim - i0))
            backward += 1
    return {"forward_rows": rows, "backward": backward}


def _sgd_replica():
    """The unsharded model after the workers' training step (SGD, lr 0.5, on the same rows)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    xt = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    model(xt).pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return grads, model.state_dict()


def test_fsdp_scoring_on_two_cpu_ranks(tmp_path):
    assert jacobian.auto_width(torch.device("cpu"), 3, 2, 5, None) == 3  # K = 3 rows in one replicated pass
    r0, r1 = _run_two_ranks(tmp_path)

    # 1. every parameter is really sharded: each rank holds a strict part of it, before and after scoring.
    for res in (r0, r1):
        assert set(res["shards"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for name, (full, local, is_dtensor) in res["shards"].items():
            assert is_dtensor and np.prod(local) < np.prod(full), (name, full, local)
            assert tuple(res["shards_after"][name]) == tuple(local)
    assert r0["shards"]["2.bias"][1] == [2] and r1["shards"]["2.bias"][1] == [1]
    n_params = 5 * 6 + 6 + 6 * 3 + 3
    for which, units in (("fsdp1", 3), ("fsdp1_flat", 1)):   # FSDP1: each rank holds part of the flat parameters
        assert r0["fsdp1_units"][which] == r1["fsdp1_units"][which] == units
        local = [r0["fsdp1_local"][which], r1["fsdp1_local"][which]]
        assert max(local) < n_params <= sum(local) <= n_params + 2 * units, (which, local)  # + padding

    mb = {"five_two": [2, 2, 1], "zero_three": [2, 1]}   # micro-batches of 2 over the padded rows
    expected = {
        "five_two": _replicated_passes(mb["five_two"]),                                   # [2, 6, 2, 6, 1, 3], 3
        "zero_three": _replicated_passes(mb["zero_three"]),                               # [2, 6, 1, 3], 2
        "five_two_loop": {"forward_rows": [2, 2, 1], "backward": 3 * 3},                  # K backward each
        "two_five_batched": {"forward_rows": [1, 5], "backward": 2},                      # size probe, then ceil(3/2)
        "fsdp1_five_two": _replicated_passes(mb["five_two"]),
        # micro-batch size from a gradient-free forward of one row, then all 3 rows at once
        "fsdp1_zero_three": {"forward_rows": [1] + _replicated_passes([3])["forward_rows"], "backward": 1},
        # 160 bytes hold one row of a micro-batch: rows held one at a time and recomputed (plan_rows:
        # 3 groups, 6 one-row fills), each fill one fresh forward (b rows) and one backward
        "fsdp1_budget": {"forward_rows": [b for b in mb["five_two"] for _ in range(1 + 6)], "backward": 6 * 3},
        "fsdp1_flat_five_two": _replicated_passes(mb["five_two"]),
    }
    vectorize = {"five_two_loop": 0, "two_five_batched": 2}
    assert set(r0["cases"]) == set(expected)
    for name, passes in expected.items():
        a, b = r0["cases"][name], r1["cases"][name]
        assert a["vectorize"] == b["vectorize"] == vectorize.get(name, "replicated"), name
        # 2. the same passes on both ranks, in every sharded block, whatever each rank's own row count
        for block in ("0", "2"):
            assert a["sharded"][block] == b["sharded"][block], (name, block, a["sharded"], b["sharded"])
            assert a["sharded"][block] == passes, (name, block, a["sharded"][block])
        # ... which the unwrapped scorer does not do: its passes differ between the ranks
        ua, ub = a["unsynchronised"]["0"], b["unsynchronised"]["0"]
        assert ua["forward_rows"] != ub["forward_rows"], name
        if name != "two_five_batched":  # there the pass counts agree and only the row counts differ
            assert len(ua["forward_rows"]) != len(ub["forward_rows"]) and ua["backward"] != ub["backward"], name
        # 3. each rank gets exactly its own rows' scores, equal to the float64 unsharded brute force
        for res in (a, b):
            x = torch.tensor(res["x"], dtype=torch.float32).reshape(-1, 5)
            ref, z = _reference(x)
            assert len(res["jepa_score"]) == x.shape[0]
            np.testing.assert_allclose(res["jepa_score"], ref.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(np.reshape(res["embedding"], (-1, 3)), z.numpy(), rtol=1e-5, atol=1e-6)
    for name in ("zero_three", "fsdp1_zero_three"):
        assert [len(r0["cases"][name]["x"]), len(r1["cases"][name]["x"])] == [0, 3]

    # 4. Scorer.embed (no gradient) under every FSDP: one forward on each rank (4 rows and 0), f(x) exact
    for which in ("fsdp2", "fsdp1", "fsdp1_flat"):
        a, b = r0["embed"][which], r1["embed"][which]
        assert [len(a["x"]), len(b["x"])] == [4, 0]
        for block in ("0", "2"):
            assert a["sharded"][block] == {"forward_rows": [4], "backward": 0}, (which, a["sharded"])
            assert b["sharded"][block] == {"forward_rows": [0], "backward": 0}, (which, b["sharded"])
        for res in (a, b):
            _, z = _reference(torch.tensor(res["x"], dtype=torch.float32).reshape(-1, 5))
            np.testing.assert_allclose(np.reshape(res["embedding"], (-1, 3)), z.numpy(), rtol=1e-5, atol=1e-6)

    # 5. FSDP still trains after the input-only backward passes: FSDP2's gathered gradient and FSDP1's
    # parameters after one SGD step are the replica's
    grads, stepped = _sgd_replica()
    for name, g in grads.items():
        np.testing.assert_allclose(r0["grads"][name], g.numpy(), rtol=1e-5, atol=1e-7)
        assert r0["grads"][name] == r1["grads"][name]
    for which in ("fsdp1", "fsdp1_flat"):
        for res in (r0, r1):
            assert set(res["stepped"][which]) == set(stepped), (which, sorted(res["stepped"][which]))
            for name, v in stepped.items():
                np.testing.assert_allclose(res["stepped"][which][name], v.numpy(), rtol=1e-5, atol=1e-6)
