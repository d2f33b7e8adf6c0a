"""torch.distributed: the helpers in one process, and jobs of 2 CPU processes under gloo.

The jobs are started as ``torchrun --standalone`` (a free port) or as plain processes joined by a
file in tmp_path (``init_method=file://``), each with one thread, like the one-process runs they are
compared with: synthesis must give the same bytes, Genie-M the same model up to float summation
order, and a failing or stuck process must end the job with one line and no file.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dfquant
from dfquant import distributed
from dfquant.cli import main
from dfquant.errors import DfquantError
from dfquant.genie import GenieLayer
from dfquant.genie.distill import _apply_swing, _skip_swing_draws, _swing_calls
from dfquant.genie.reconstruct import _Shard, _ShardLayer
from dfquant.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(dfquant.__file__).resolve().parents[1])
JOB_TIMEOUT_S = 600  # a guard against a hang of the test itself, far above any run's time


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    env.setdefault(distributed.TIMEOUT_ENV, "120")
    env.update(extra)
    return env


def _torchrun(*argv, script=None, env=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m dfquant ARGV`` (or ``SCRIPT ARGV``)."""
    target = [str(script)] if script else ["-m", "dfquant"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env or _env())


def _dfquant_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("dfquant:")]


# --------------------------------------------------------------------------------------------
# One process: the helpers
# --------------------------------------------------------------------------------------------


def test_shard_cuts_a_range_into_contiguous_near_equal_parts():
    for n in range(12):
        for parts in range(1, 6):
            pieces = [distributed.shard(n, i, parts) for i in range(parts)]
            assert pieces[0][0] == 0 and pieces[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            sizes = [hi - lo for lo, hi in pieces]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_outside_a_job_the_helpers_are_the_one_process_identity():
    t = torch.randn(3, 2)
    assert distributed.all_gather_cat(t) is t
    grads = [torch.ones(2)]
    distributed.all_reduce_sum_(grads)
    assert torch.equal(grads[0], torch.ones(2))
    assert distributed.broadcast_([t]) == 0 and distributed.max_over_ranks(5) == 5
    distributed.check_same([t], "tensors")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.claim_failure()) == (0, 1, True, True)
    assert distributed.shard(7) == (0, 7)
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout().total_seconds() == 12.5
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(DfquantError, match=distributed.TIMEOUT_ENV):
            distributed.timeout()


def test_gpus_a_numbered_one_for_every_process_is_refused_and_each_takes_its_own(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.launched() and distributed.backend_for("auto") == "nccl" and distributed.backend_for("cpu") == "gloo"
    with pytest.raises(DfquantError, match="every process of the job on the same GPU"):
        distributed.init("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for count, index in ((2, 1), (1, 0)):  # its local rank's GPU, or the only one it sees
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert distributed.gpu_index() == index
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DfquantError, match="no GPU of its own"):
        distributed.gpu_index()


def test_fingerprints_tell_one_changed_bit_and_a_moved_value_apart():
    fp = distributed._fingerprint
    a = torch.randn(1000)
    b = a.clone()
    b[567] = torch.nextafter(b[567], torch.tensor(float("inf")))  # one ulp
    assert torch.equal(fp([a, torch.arange(5, dtype=torch.int8)]), fp([a.clone(), torch.arange(5, dtype=torch.int8)]))
    assert not torch.equal(fp([a]), fp([b]))
    assert not torch.equal(fp([a]), fp([a.flip(0)]))
    assert not torch.equal(fp([a.half()]), fp([b.half() * 2]))
    assert torch.equal(fp([a]), fp([a], block=7))  # blocks do not change the sums


def test_skipping_swing_draws_reaches_the_generator_state_of_the_earlier_batches():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()  # two strided convs, both drawing at 32 x 32
    rng = torch.Generator().manual_seed(5)
    _apply_swing(model, rng)
    assert len(_swing_calls(model, (3, 32, 32), torch.device("cpu"))) == 2
    start = rng.get_state()
    assert torch.equal(rng.get_state(), start)  # the dry run used a spare generator
    with torch.no_grad():
        for _ in range(3):  # three iterations of earlier batches (any batch size)
            model(torch.randn(2, 3, 32, 32))
    after_forwards = rng.get_state()
    assert not torch.equal(after_forwards, start)
    rng.set_state(start)
    _skip_swing_draws(model, (3, 32, 32), torch.device("cpu"), 3)
    assert torch.equal(rng.get_state(), after_forwards)


def test_each_process_gets_its_rows_of_the_one_process_qdrop_mask(digits):
    full = torch.rand((5, 3, 4), generator=torch.Generator().manual_seed(1))
    shards = [_Shard(5, *distributed.shard(5, i, 2)) for i in range(2)]
    parts = [s.mask((s.hi - s.lo, 3, 4), 0.5, torch.Generator().manual_seed(1), "cpu") for s in shards]
    assert torch.equal(torch.cat(parts), (full < 0.5).float()) and [s.part for s in shards] == [0.6, 0.4]
    # in one process (the whole batch) the layer is Genie's own, draw for draw
    qmodel, _ = dfquant.quantize(digits[0], "rtn", 4, 4)
    layer, w = qmodel.conv2, digits[0].conv2.weight
    x = torch.randn(5, 16, 8, 8)
    ours, genie = _ShardLayer(layer, w, 0.5, torch.Generator().manual_seed(3), _Shard(5, 0, 5)), GenieLayer(layer, w, 0.5, torch.Generator().manual_seed(3))
    a, b = ours(x), genie(x)
    assert torch.equal(a, b) and torch.equal(ours.rng.get_state(), genie.rng.get_state())
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(ours.v.grad, genie.v.grad) and torch.equal(ours.a_scale.grad, genie.a_scale.grad)


def test_python_dash_m_dfquant_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "dfquant", "list"], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0 and "resnet20" in out.stdout


# --------------------------------------------------------------------------------------------
# Jobs of two processes (gloo)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_synthesis_writes_the_one_process_files_bit_for_bit(capsys, tmp_path):
    # 14 images in batches of 4, 4, 3, 3: rank 0 makes batches 0-1, rank 1 batches 2-3, its swing
    # generator first skipped past batches 0-1 (ResNet-20 has two swing convs)
    argv = ["--threads", "1", "--no-progress", "synthesize", "--model", "resnet20", "--random-init", "--seed", "2", "-n", "14", "--iters", "3", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "one.safetensors")]) == 0
    capsys.readouterr()
    job = _torchrun(*argv, "--out", str(tmp_path / "two.safetensors"))
    assert job.returncode == 0, job.stderr[-3000:]
    for suffix in (".safetensors", ".png"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert job.stdout.count("wrote 14 images") == 1 and "on 2 processes" in job.stdout  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "one.safetensors", "two.png", "two.safetensors"]


def _codes_and_units(path: Path):
    q, _ = dfquant.load_quantized(path)
    codes = {n: t for n, t in q.state_dict().items() if n.endswith("weight_int")}
    units = json.loads(path.with_suffix(".json").read_text())["report"]["config"]["genie"]["units"]
    return codes, units


@pytest.mark.slow
def test_torchrun_zeroq_and_genie_m_match_one_process(capsys, digits, tmp_path):
    # 256 ZeroQ images in two batches of 128 (one per process), then Genie-M on batches of 32
    argv = ["--threads", "1", "--no-progress", "quantize", "--model", "digits_cnn", "--method", "zeroq", "--samples", "256", "--distill-iters", "5", "--recon-iters", "60", "--json"]
    assert main([*argv, "--out", str(tmp_path / "one"), "--save-synthetic", str(tmp_path / "one_images")]) == 0
    one = json.loads(capsys.readouterr().out)
    job = _torchrun(*argv, "--out", str(tmp_path / "two"), "--save-synthetic", str(tmp_path / "two_images"))
    assert job.returncode == 0, job.stderr[-3000:]
    assert len(job.stdout.splitlines()) == 1  # one JSON object, from rank 0
    two = json.loads(job.stdout)
    assert two["genie"]["processes"] == 2 and "processes" not in one["genie"]
    assert (tmp_path / "one_images.safetensors").read_bytes() == (tmp_path / "two_images.safetensors").read_bytes()
    (codes1, units1), (codes2, units2) = _codes_and_units(tmp_path / "one.safetensors"), _codes_and_units(tmp_path / "two.safetensors")
    same = sum(int((codes1[n] == codes2[n]).sum()) for n in codes1)
    changed = sum(u["codes_changed"] for u in units1)
    assert changed > 100  # the training moved codes: a wrong gradient would move others
    assert same >= 0.99 * sum(c.numel() for c in codes1.values())
    assert [u["name"] for u in units1] == [u["name"] for u in units2]
    assert units2[0]["before"] == units1[0]["before"]  # the same start on the same images
    for u1, u2 in zip(units1, units2):
        assert u2["before"] == pytest.approx(u1["before"], rel=0.01)
        assert u2["after"] == pytest.approx(u1["after"], rel=0.01)
        assert u2["ranks_differed"] == 0  # the summed gradients gave every process the same steps
    assert abs(two["quant_top1"] - one["quant_top1"]) <= 1.0


_LIBRARY_JOB = '''
import datetime, sys
import torch, torch.distributed as dist
rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
import dfquant
from dfquant.models import create_model
torch.manual_seed(0)
model = create_model("resnet20")
images = dfquant.synthesize(model, 10, method="genie", iters=3, batch_size=4, seed=1, device="cpu", progress=False)
q, report = dfquant.quantize(model, "genie", 4, 4, synthetic=images, recon_iters=5, batch_size=5, device="cpu", seed=0)
torch.save(dict(images=images, state=q.state_dict(), units=report.config["genie"]["units"]), out)
'''


@pytest.mark.slow
def test_the_library_in_a_process_group_joined_by_file_matches_one_process(tmp_path):
    """dfquant.synthesize and dfquant.quantize called by each process of a group the caller made."""
    script = tmp_path / "job.py"
    script.write_text(_LIBRARY_JOB)

    def start(rank, world):
        args = [sys.executable, str(script), str(rank), str(world), str(tmp_path / "init"), str(tmp_path / f"out{world}.{rank}")]
        return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for procs in ([start(0, 1)], [start(0, 2), start(1, 2)]):
        for p in procs:
            _, err = p.communicate(timeout=JOB_TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
    one, r0, r1 = (torch.load(tmp_path / name) for name in ("out1.0", "out2.0", "out2.1"))
    assert torch.equal(r0["images"], one["images"]) and torch.equal(r1["images"], one["images"])
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # every process, the same model
    codes = [k for k in one["state"] if k.endswith("weight_int")]
    same = sum(int((one["state"][k] == r0["state"][k]).sum()) for k in codes)
    assert same >= 0.99 * sum(one["state"][k].numel() for k in codes)
    for u1, u2 in zip(one["units"], r0["units"]):
        assert u2["after"] == pytest.approx(u1["after"], rel=0.01) and u2["ranks_differed"] == 0


_INJECT = '''
import os, sys, time
import dfquant.genie.distill as distill
from dfquant.cli import main
from dfquant.errors import DfquantError

def fail(*args, **kwargs):
    raise DfquantError("injected failure")

def hang(*args, **kwargs):
    time.sleep(3600)

if os.environ["RANK"] == "1":
    distill._genie_batch = fail if os.environ["INJECT"] == "raise" else hang
sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_or_stuck_process_ends_the_job_in_one_line_and_leaves_no_file(digits, tmp_path, how):
    script = tmp_path / "inject.py"
    script.write_text(textwrap.dedent(_INJECT))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--threads", "1", "--no-progress", "synthesize", "--model", "digits_cnn", "-n", "16", "--iters", "30", "--batch-size", "8", "--out", str(out / "x")]
    job = _torchrun(*argv, script=script, env=_env(INJECT=how, **{distributed.TIMEOUT_ENV: "5"}))
    assert job.returncode != 0
    lines = _dfquant_lines(job.stderr)
    assert len(lines) == 1, job.stderr[-3000:]
    if how == "raise":  # rank 1's own error; rank 0, stopped by torchrun, says nothing
        assert lines[0] == "dfquant: error: rank 1: injected failure"
    else:  # rank 0 waits for rank 1's images no longer than the timeout
        assert lines[0].startswith("dfquant: error: rank 0: gathering results: another process of the job failed or did not answer within 5 s")
    assert "terminate called" not in job.stderr and not re.search(r'File ".*dfquant', job.stderr)  # no trace of ours
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_commands_without_distributed_work_are_refused_under_torchrun(digits, tmp_path):
    job = _torchrun("--no-progress", "quantize", "--model", "digits_cnn", "--method", "squant", "--out", str(tmp_path / "q"))
    assert job.returncode != 0
    lines = _dfquant_lines(job.stderr)
    assert len(lines) == 1 and "run it without torchrun" in lines[0], job.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
