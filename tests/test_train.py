"""
train.py end to end on a miniature world (tests/test_data.py builds it): a tiny InternVL base, the four data types
plus a webdataset shard, a VQ code cache with random codes.

  python -m pytest tests/test_train.py -q

- DDP: `torchrun --standalone --nproc_per_node=2` (gloo, 1 micro-step) ends with the same trainable tensors as one
  process with 2 micro-steps on the same global batch (allclose 1e-6), after 6 steps with condition dropout on.
- Exact resume: SIGKILL while parked after step 3 (the checkpoint of step 2 is on disk), then --resume: every trainable
  tensor and the saved model bitwise equal to an uninterrupted run; the same on 2 ranks (launcher and workers killed
  together). A SIGKILL in the middle of a checkpoint write leaves the previous ckpt.pt loadable, and resuming from it
  ends bitwise equal too. SIGTERM saves after the current step and exits with 143.
- Each WoHG stage (and stage 0, the base MLLM) changes exactly its trainable set: every trainable tensor moved,
  every other one bit-identical; stage 0 writes a base that from_internvl loads back.
- Without a code cache, output images are encoded by the VQGAN, whose codebook and grid set the new run's config.
- Bad data: a dataset with every kind of bad record trains to the end, names the first ones and counts every kind;
  --strict-data stops at the first with its name. Bad records on one rank only: both ranks take every step, the
  counts add up over the ranks, the weights equal one process's, and --strict-data stops both ranks. A non-finite
  loss stops the run naming step and batch, or is skipped and counted with --skip-nonfinite.
- One optimizer step against a plain-PyTorch reference, and the paper's stage table as literals:
  tests/test_train_reference.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import armor
import train
from test_data import bad_world, make_world
from test_train_reference import figure5_names

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread: same bits in every process
HOOKED = str(REPO / "tests" / "hooked_train.py")  # train.py with a park or a kill at a given step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainworld")
    make_world(root)
    return root


def data_args(root, kinds=("t2t", "ti2t", "t2i", "t2ti")):
    out = []
    for k in kinds:
        out += ["--data", f"{k}={root / (k + '.jsonl')}"]
    if "t2i" in kinds:
        out += ["--data", f"t2i={root / 'shards' / '*.tar'}"]
    return out


def run_args(root, out, **kw):
    """Stage 3 from the base: every ARMOR group trains, both losses, condition dropout 0.5."""
    a = ["--stage", "3", "--base", str(root / "base"), "--codes", str(root / "codes"), *data_args(root),
         "--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup", "2",
         "--num-adapter-layers", "1", "--cfg-drop", "0.5", "--save-every", "2", "--out", str(out), "--device", "cpu"]
    for k, v in kw.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def run(args, env=None, timeout=120, script="train.py"):
    p = subprocess.run([sys.executable, script, *args], cwd=REPO, env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    return p


def torchrun(args, env=None, timeout=180):
    """train.py on 2 gloo ranks; the whole process group is killed if it outlives the timeout (a hang)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    p = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError(f"train.py on 2 ranks still running after {timeout} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def trained(out):
    """The trainable tensors of a run's ckpt.pt and the step it was written at."""
    ck = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=False)
    return ck["trainable"], ck["step"]


@pytest.fixture(scope="module")
def reference(world):
    out = world / "ref"
    p = run(run_args(world, out))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 6 and re.fullmatch(r"step 6/6 \| loss [\d.]+ \(text [\d.]+, img [\d.]+\) \| lr [\de.-]+ \| "
                                            r"\d+ ms \| [\d,]+ tok/s \| eta \w+", lines[-1]), lines[-1]
    return out


def assert_same_run(out, ref, exact=True):
    a, step_a = trained(out)
    b, step_b = trained(ref)
    assert step_a == step_b == 6 and sorted(a) == sorted(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    if exact:
        sa, sb = load_file(Path(out) / "model.safetensors"), load_file(Path(ref) / "model.safetensors")
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [json.loads(ln)["step"] for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------------------
# DDP


@pytest.fixture(scope="module")
def ddp_run(world):
    out = world / "ddp"
    p = torchrun(run_args(world, out, grad_accum=1))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks" in p.stdout and p.stdout.count("step 6/6") == 1  # rank 0 logs alone
    return out


@pytest.mark.e2e
def test_two_processes_equal_one(ddp_run, reference):
    # the whole model was not saved twice, and the losses the two runs logged agree
    assert_same_run(ddp_run, reference, exact=False)
    la = [json.loads(ln)["loss"] for ln in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln)["loss"] for ln in (reference / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.e2e
def test_ddp_sigkill_then_resume_equals_the_uninterrupted_run(world, ddp_run):
    out = world / "ddp_killed"
    args = run_args(world, out, grad_accum=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HOOKED, "park=3",
           *args]
    # both ranks park after step 3 (rank 0 has then written its metrics line); the two ranks' prints interleave
    # mid-line, so the metrics file says when, and the kill takes launcher and workers at once
    log = open(world / "ddp_killed.log", "w")
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").exists() and '"step": 3,' in (out / "metrics.jsonl").read_text():
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        p.wait(timeout=60)
    finally:
        log.close()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL, (world / "ddp_killed.log").read_text()
    assert trained(out)[1] == 2 and not (out / "model.safetensors").exists()
    p = torchrun(args + ["--resume"])
    assert p.returncode == 0 and f"resumed from {out / 'ckpt.pt'} at step 2" in p.stdout, p.stdout + p.stderr
    assert_same_run(out, ddp_run)  # bitwise: the same 2-rank sums in the same order


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume


def park_and_signal(args, step, sig):
    """Start a run that parks after `step`, send `sig` while it waits, return (returncode, stdout)."""
    p = subprocess.Popen([sys.executable, HOOKED, f"park={step}", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=ENV)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith(f"test hook: parked after step {step}"):
                p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        p.kill()
    return p.returncode, "".join(lines)


@pytest.mark.e2e
def test_sigkill_then_resume_is_bitwise_equal(world, reference):
    step = 3  # after the checkpoint of step 2, so the resume has one to start from and one step to redo
    out = world / f"killed{step}"
    rc, log = park_and_signal(run_args(world, out), step, signal.SIGKILL)
    assert rc == -signal.SIGKILL, log
    assert trained(out)[1] == 2 and not (out / "model.safetensors").exists()
    p = run(run_args(world, out) + ["--resume"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step 2" in p.stdout, p.stdout
    assert_same_run(out, reference)


@pytest.mark.e2e
def test_kill_during_checkpoint_write_keeps_the_previous(world, reference):
    out = world / "torn"
    p = run(["kill-in-save=2", *run_args(world, out)], script=HOOKED)  # the second save, at step 4
    assert p.returncode == -signal.SIGKILL
    assert (out / "ckpt.pt.tmp").exists() and trained(out)[1] == 2  # the torn file is the temporary one
    p = run(run_args(world, out) + ["--resume"])
    assert p.returncode == 0 and "at step 2" in p.stdout, p.stdout + p.stderr
    assert_same_run(out, reference)


@pytest.mark.e2e
def test_sigterm_saves_after_the_step_and_exits(world):
    out = world / "term"
    rc, log = park_and_signal(run_args(world, out), 3, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM after step 4" in log, log
    assert trained(out)[1] == 4 and "Traceback" not in log and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Trainable sets (in process: train.main returns the trained model)


def quick(root, out, stage, *extra):
    return ["--stage", str(stage), "--codes", str(root / "codes"), "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
            "--warmup", "1", "--out", str(out), "--prefetch", "0", "--device", "cpu", *extra]


def assert_trained_exactly(before, after, names):
    sa, sb = after.state_dict(), before.state_dict()
    assert sorted(sa) == sorted(sb)
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed == set(names), sorted(changed ^ set(names))


def test_each_stage_trains_exactly_its_set(world, capsys):
    vq = dict(num_image_codes=64, image_grid=4, image_px=64, num_adapter_layers=1)
    before = armor.from_internvl(str(world / "base"), seed=0, verbose=False, **vq)
    init = ["--base", str(world / "base"), "--num-adapter-layers", "1"]
    for stage in (1, 2, 3):
        out = world / f"stage{stage}"
        after = train.main(quick(world, out, stage, *init, *data_args(world)))
        assert_trained_exactly(before, after, figure5_names(before, stage))  # the paper's sets, as literals
        assert "alpha 1, beta 0" in capsys.readouterr().out if stage == 1 else True
        # the saved checkpoint (partial, on top of the base) is the trained model
        loaded = armor.from_pretrained(str(out), verbose=False)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in after.state_dict().items())
        assert (out / "tokenizer.json").exists()
        before, init = loaded, ["--init", str(out)]


def test_snapshots_are_the_model_at_their_step(world):
    """--snapshot-every saves <out>/step<N>: with a constant learning rate (min-lr = lr), the step-2 snapshot of a
    4-step run is the final model of a 2-step run."""
    init = ["--base", str(world / "base"), "--num-adapter-layers", "1", "--min-lr", "1e-2", *data_args(world)]
    long, short = world / "snap_long", world / "snap_short"
    last = train.main(quick(world, long, 2, *init, "--steps", "4", "--snapshot-every", "2"))
    train.main(quick(world, short, 2, *init, "--steps", "2"))
    snap, two = (armor.from_pretrained(str(d), verbose=False).state_dict() for d in (long / "step2", short))
    assert all(torch.equal(v, two[k]) for k, v in snap.items())
    assert not all(torch.equal(v, snap[k]) for k, v in last.state_dict().items())  # the run went on after it
    assert not (long / "step4").exists()  # the last step is the run's own output


def test_stage0_trains_the_whole_base(world):
    torch.manual_seed(0)  # train.py builds the model after the same seeding
    out = world / "stage0"
    after = train.main(["--stage", "0", "--preset", "tiny", "--tokenizer", str(world / "tok"), *data_args(
        world, ("t2t", "ti2t")), "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--warmup", "1", "--out",
        str(out), "--device", "cpu"])
    torch.manual_seed(0)
    before = armor.InternVL(train.preset_config("tiny", after.config.llm.vocab_size))
    armor.init_weights(before)
    assert_trained_exactly(before, after, [k for k, _ in after.named_parameters()])
    base = armor.from_internvl(str(out), armor=False, verbose=False)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in after.state_dict().items())


def test_output_images_encoded_by_the_vqgan_without_a_cache(world):
    from vqgan import VQGAN, VQGANConfig, save_vqgan

    torch.manual_seed(0)
    save_vqgan(VQGAN(VQGANConfig.toy()), world / "vq")  # random weights: 512 codes, f = 8
    args = quick(world, world / "vqrun", 2, "--base", str(world / "base"), "--num-adapter-layers", "1",
                 "--data", f"t2i={world / 't2i.jsonl'}", "--vqgan", str(world / "vq"), "--image-px", "64",
                 "--strict-data")
    args.remove("--codes")
    args.remove(str(world / "codes"))
    model = train.main(args)
    c = model.config  # the new run's ARMOR config comes from the VQGAN: 512 codes, 64 px / 8 = 8x8 per image
    assert (c.num_image_codes, c.image_grid, c.image_px) == (512, 8, 64)
    last = json.loads((world / "vqrun" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["tokens"] > 4 * 66  # every example holds an image of 64 codes + 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad data, non-finite losses, toy defaults


def bad_args(world, out, *extra):
    kinds = ("t2t", "ti2t", "t2i", "t2ti")
    data_ = [a for k in kinds for a in ("--data", f"{k}={world / f'bad_{k}.jsonl'}")]
    # batch 1 x 4 micro-steps: a bad record leaves a micro-batch empty, which must still step in line
    return ["--stage", "3", "--base", str(world / "base"), "--codes", str(world / "codes"), *data_,
            "--num-adapter-layers", "1", "--max-len", "200", "--steps", "12", "--batch-size", "1", "--grad-accum",
            "4", "--warmup", "1", "--out", str(out), "--device", "cpu", *extra]


def test_bad_data_is_skipped_and_counted(world, capsys):
    names = bad_world(world)
    train.main(bad_args(world, world / "bad"))
    log = capsys.readouterr().out
    assert "step 12/12" in log
    last = json.loads((world / "bad" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(last["skipped"][k] >= 1 for k in ("malformed", "empty", "missing_image", "unreadable_image",
                                                 "missing_codes", "too_long")), last["skipped"]
    named = re.findall(r"data: skipped (bad_\w+\.jsonl:\d+)", log)
    assert named and set(named) <= {n for v in names.values() for n in v}
    assert re.search(r"data: skipped (\d+ [a-z ]+, )+\d+ too long", log)  # the summary at the end
    with pytest.raises(SystemExit, match=r"error: bad data \(--strict-data\): bad_\w+\.jsonl:\d+ \(\w+\): ") as e:
        train.main(bad_args(world, world / "bad_strict", "--strict-data"))
    name = re.search(r"(bad_\w+\.jsonl:\d+)", str(e.value)).group(1)
    assert name in {n for v in names.values() for n in v}


def one_rank_bad_world(root, steps):
    """t2t records (all good) and t2i records whose output images have no codes (all bad), and a seed whose first
    `steps` global batches of 2 give rank 0 (even positions) only t2t and rank 1 (odd positions) some of each.
    -> (data arguments, seed, number of bad examples)."""
    path = root / "nocodes_t2i.jsonl"
    path.write_text("".join(json.dumps({"id": f"nocodes-{i}", "out_images": ["images/uncached.png"], "conversations": [
        {"from": "human", "value": "Draw."}, {"from": "gpt", "value": "<gen_image>"}]}) + "\n" for i in range(3)))
    from data import Mixture

    for seed in range(1000):
        kinds = [p.kind for p in Mixture({"t2t": 8, "t2i": 3}, {"t2t": 1, "t2i": 1}, seed).take(2 * steps)]
        if set(kinds[0::2]) == {"t2t"} and set(kinds[1::2]) == {"t2t", "t2i"}:
            args = ["--data", f"t2t={root / 't2t.jsonl'}", "--data", f"t2i={path}", "--mix", "t2t=1,t2i=1"]
            return args, seed, kinds.count("t2i")
    raise AssertionError("no seed below 1000 puts the bad records on rank 1 only")


@pytest.mark.e2e
def test_bad_data_on_one_rank_keeps_both_in_step(world):
    data_, seed, n_bad = one_rank_bad_world(world, 4)
    common = ["--stage", "3", "--base", str(world / "base"), "--codes", str(world / "codes"), *data_, "--seed",
              str(seed), "--num-adapter-layers", "1", "--steps", "4", "--batch-size", "1", "--warmup", "1",
              "--lr", "3e-3", "--device", "cpu"]
    # rank 1 meets bad records (some of its micro-batches are empty), rank 0 none: both take every step (a rank
    # that skipped one would leave the other waiting in a collective: torchrun's timeout), and the counts add up
    out = world / "bad_ddp"
    p = torchrun(common + ["--out", str(out)], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and n_bad >= 1
    assert rows[-1]["skipped"] == {k: n_bad if k == "missing_codes" else 0 for k in rows[-1]["skipped"]}
    assert f"data: skipped {n_bad:,} missing codes" in p.stdout
    # and the same global batch on one process (2 micro-steps) ends at the same weights
    one = world / "bad_one"
    train.main(common + ["--grad-accum", "2", "--out", str(one), "--prefetch", "0"])
    assert json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])["skipped"] == rows[-1]["skipped"]
    a, b = trained(out)[0], trained(one)[0]
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # --strict-data: the rank with the bad record names it, the other says why it stops; neither hangs
    p = torchrun(common + ["--out", str(world / "bad_strict_ddp"), "--strict-data"], timeout=120)
    assert p.returncode != 0 and "error: another rank stopped on bad data (--strict-data)" in p.stderr, p.stderr
    assert re.search(r"error: bad data \(--strict-data\): nocodes_t2i\.jsonl:\d+ \(nocodes-\d\)", p.stderr), p.stderr


def test_nonfinite_loss_stops_or_is_skipped(world, monkeypatch, capsys):
    forward, calls = armor.Armor.forward, []

    def poisoned(self, *a, **k):  # the third forward (= step 3, one micro-step per step) gives a NaN loss
        out = forward(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            out.loss, out.loss_text = out.loss * float("nan"), out.loss_text * float("nan")
        return out
    monkeypatch.setattr(armor.Armor, "forward", poisoned)
    args = quick(world, world / "nan", 3, "--base", str(world / "base"), "--num-adapter-layers", "1",
                 *data_args(world), "--steps", "4")
    with pytest.raises(SystemExit, match="stopped at step 3 on a non-finite loss"):
        train.main(args)
    assert re.search(r"error: non-finite loss at step 3; batch \(rank 0\): \S+\.jsonl:\d+", capsys.readouterr().out)
    calls.clear()
    model = train.main(args + ["--skip-nonfinite"])
    assert "skipped update: non-finite loss at step 3" in capsys.readouterr().out
    last = json.loads((world / "nan" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["nonfinite_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_toy_defaults_fill_in_a_bare_command(world, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "TOY_ARGS", str(tmp_path / "stage{}.args"))
    with pytest.raises(train.UsageError, match=r"toy world's defaults .*stage2\.args\) are not here"):
        train.parse_args(["--stage", "2"])
    (tmp_path / "stage2.args").write_text(f"# comment lines and blank ones are skipped\n--stage=2\n--init=toy/stage1\n"
                                          f"\n--data=t2i={world}/t2i.jsonl\n--codes=toy/codes\n--steps=7\n")
    with pytest.raises(train.UsageError, match="read from the repository root: cd "):
        train.parse_args(["--stage", "2"])  # from another folder the file's relative paths would point elsewhere
    monkeypatch.chdir(tmp_path.parent)  # the "repository root" of these defaults
    args = train.parse_args(["--stage", "2", "--steps", "9"])  # the command line still wins
    assert (args.init, args.steps, args.beta, args.cfg_drop, args.out) == ("toy/stage1", 9, 1.0, 0.1, "out/stage2")
    assert args.data == [f"t2i={world}/t2i.jsonl"] and args.codes == "toy/codes"
    args = train.parse_args([f"@{tmp_path / 'stage2.args'}", "--init", "out/mine"])  # the file named, then overridden
    assert (args.init, args.steps) == ("out/mine", 7)


def test_the_toy_args_files_are_the_pipelines_settings(monkeypatch):
    """toy/stage<N>.args, what a bare `train.py --stage N` reads: the toy pipeline's budgets (pipeline.TRAIN), the
    data and code cache its prepare step makes, and that step as --prepare."""
    from toy import pipeline

    monkeypatch.chdir(Path(train.__file__).parent)  # the files' paths are relative to the repository root
    p = pipeline.paths()
    for stage in range(4):
        args = train.parse_args(["--stage", str(stage)])
        assert (args.steps, args.batch_size, args.lr, args.warmup) == pipeline.TRAIN[stage]
        assert args.mix == pipeline.MIX.get(stage)
        data = [f"{k}={os.path.abspath(v)}" for k, v in (d.split("=", 1) for d in args.data)]
        assert data == pipeline._data_args(p, stage)
        assert args.prepare == f"python -m toy prepare --stage {stage}" and args.out == f"out/toy_stage{stage}"
        assert (os.path.abspath(args.codes) if args.codes else None) == (p["codes"] if stage else None)
        model = {"base": args.base, "init": args.init, "tokenizer": args.tokenizer}
        assert {k: os.path.abspath(v) for k, v in model.items() if v} == {
            0: {"tokenizer": os.path.join(p["ship"], "base")}, 1: {"base": os.path.join(p["ship"], "base")},
            2: {"init": os.path.join(p["ship"], "armor")}, 3: {"init": os.path.join(p["ship"], "armor")}}[stage]


def test_prepare_runs_with_this_python(tmp_path):
    marker = tmp_path / "made"
    train.run_prepare(f"python -c \"import sys; open({str(marker)!r}, 'w').write(sys.executable)\"")
    assert marker.read_text() == sys.executable
    with pytest.raises(SystemExit, match=r"^error: --prepare .* failed \(exit status 3\)$"):
        train.run_prepare("python -c 'raise SystemExit(3)'")
