"""The trained test bed: the small build reaches the accuracies the module documents, read back
from the saved files, and is reproduced byte for byte; its tokenizer is the encoding the training
used; a shipped build is installed instead of training when it is of this code version and every
file is the one its hash list names, and refused otherwise."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import composer.testbed
from composer.testbed import (
    BASE_MAX_ACCURACY,
    BRICK_MIN_ACCURACY,
    TASKS,
    VARIANTS,
    TestBed,
    base_name,
    build_testbed,
    code_version,
    encode_example,
    ensure_testbed,
    exact_match,
    file_hashes,
    format_prompt,
    load_testbed,
    read_hashes,
    shipped_root,
    write_hash_list,
)

pytestmark = pytest.mark.slow


def test_task_answers_follow_their_rule() -> None:
    rng = random.Random(7)
    for _ in range(50):
        text, answer = TASKS["reverse"].generate(rng)
        assert answer == "".join(reversed(text))
        text, answer = TASKS["add"].generate(rng)
        left, right = text.split("+")
        assert int(answer) == int(left) + int(right)
        text, answer = TASKS["date"].generate(rng)
        year, month, day = text.split("-")
        assert answer == f"{day}/{month}/{year}"
        text, answer = TASKS["sort_digits"].generate(rng)
        assert answer.split(",") == sorted(text.split(","))
        text, answer = TASKS["parity"].generate(rng)
        assert answer == ("odd" if int(text[-1]) in (1, 3, 5, 7, 9) else "even")


def _in_order(text: str) -> bool:
    """Whether every character of ``text`` follows the one before it in a-z, A-Z or 0-9 (z to a,
    Z to A and 9 to 0 wrap around)."""
    cycles = ("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789")
    for cycle in cycles:
        if all(c in cycle for c in text):
            return all(cycle.index(b) == (cycle.index(a) + 1) % len(cycle) for a, b in itertools.pairwise(text))
    return False


def test_runs_are_stretches_of_an_alphabet_in_order() -> None:
    rng = random.Random(3)
    runs = [composer.testbed._run(rng) for _ in range(300)]
    assert all(4 <= len(run) <= 9 and _in_order(run) for run in runs)
    assert {run[0].isdigit() for run in runs} == {True, False}
    assert {run[0].isupper() for run in runs if not run[0].isdigit()} == {True, False}
    assert any("za" in run or "ZA" in run or "90" in run for run in runs)  # the wrap is taught too


@pytest.mark.parametrize("variant", ["full", "small"])
def test_the_base_copies_its_share_of_runs_and_no_eval_input(variant: str) -> None:
    """The full base copies task inputs and, as a quarter of its rows, runs of the alphabet (the
    order caesar and add rest on); the small one task inputs only. Neither sees an eval input."""
    recipe = VARIANTS[variant]
    texts = composer.testbed._base_texts(0, recipe)
    sample = [next(texts) for _ in range(4000)]
    evals = {text for task in recipe.tasks for text, _ in composer.testbed._eval_set(0, task, recipe.eval_size)}
    assert not evals & set(sample)
    # A task input can happen to be in order ("12345" for parity), rarely: none of the small sample.
    share = sum(len(text) >= 4 and _in_order(text) for text in sample) / len(sample)
    assert share == pytest.approx(recipe.base_runs, abs=0.03)
    assert recipe.base_runs == (0.25 if variant == "full" else 0.0)


def _code_versions_of(source: str, tmp_path: Path) -> tuple[str, str]:
    """(full, small) code versions of a copy of the module with ``source`` as its text."""
    import importlib.util

    path = tmp_path / f"testbed_{len(list(tmp_path.iterdir()))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        return module.code_version("full"), module.code_version("small")
    finally:
        del sys.modules[path.stem]


def test_code_version_ignores_docs_and_the_other_variants_recipe(tmp_path: Path) -> None:
    """Docs and comments can change without retraining, and tuning the small variant leaves a
    shipped full build valid; code and the variant's own recipe cannot."""
    source = Path(composer.testbed.__file__).read_text()
    full, small = _code_versions_of(source, tmp_path)
    assert (full, small) == (code_version("full"), code_version("small"))
    documented = source.replace('"""The trained test bed', '"""Reworded: the trained test bed', 1)
    documented = documented.replace("# Early stop:", "# Reworded comment. Early stop:", 1)
    assert documented != source
    assert _code_versions_of(documented, tmp_path) == (full, small)
    small_recipe = source[source.index('"small": _Recipe(') :]
    retuned = source.replace(small_recipe, small_recipe.replace("base_steps=300", "base_steps=301", 1), 1)
    assert retuned != source
    retuned_full, retuned_small = _code_versions_of(retuned, tmp_path)
    assert retuned_full == full and retuned_small != small
    rule = "_CHECK_EVERY, _STOP_ACCURACY, _PATIENCE = 50,"
    recoded = source.replace(rule, rule.replace("50", "51"), 1)
    assert recoded != source
    recoded_full, recoded_small = _code_versions_of(recoded, tmp_path)
    assert recoded_full != full and recoded_small != small


def _assert_reaches_documented_accuracies(bed: TestBed) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert set(bed.tasks) == set(VARIANTS[bed.variant].tasks)
    for task in bed.tasks.values():
        base = AutoModelForCausalLM.from_pretrained(bed.base_dir)
        base_accuracy = exact_match(base, task.eval_set)
        brick_accuracy = exact_match(PeftModel.from_pretrained(base, task.brick_dir), task.eval_set)
        # measured again from the saved files, not taken from the manifest
        assert base_accuracy == task.base_accuracy, task.name
        assert brick_accuracy == task.brick_accuracy, task.name
        assert brick_accuracy >= BRICK_MIN_ACCURACY[bed.variant], task.name
        assert base_accuracy <= BASE_MAX_ACCURACY, task.name
        assert 0 < task.brick_steps <= VARIANTS[bed.variant].brick.max_steps, task.name


def test_small_build_reaches_documented_accuracies(small_testbed: TestBed) -> None:
    _assert_reaches_documented_accuracies(small_testbed)


@pytest.mark.timeout(2400)  # a build each, like the session's (see conftest)
@pytest.mark.parametrize("seed", [1, 2])
def test_small_builds_of_other_seeds_reach_documented_accuracies(seed: int, testbed_cache: Path) -> None:
    """The recipe is not tuned to seed 0: other seeds' data, bases and bricks reach the bar too."""
    _assert_reaches_documented_accuracies(ensure_testbed(testbed_cache, seed=seed, variant="small"))


def test_small_build_is_reproduced_byte_for_byte(small_testbed: TestBed, tmp_path: Path) -> None:
    """The same seed gives the same files, whether the bricks train in worker processes or in
    this one (the session's build used the default workers)."""
    again = build_testbed(tmp_path / "again", seed=small_testbed.seed, variant="small", workers=1)
    hashes = file_hashes(again.root)
    assert hashes == file_hashes(small_testbed.root)
    assert any(name.endswith("adapter_model.safetensors") for name in hashes)
    assert "base/model.safetensors" in hashes


def test_exact_match_is_the_match_of_the_greedy_answers(small_testbed: TestBed) -> None:
    """Read from one forward of each prompt and its answer, exact match is what decoding the
    greedy answer and comparing it gives, on pairs some of which each model gets right and some
    wrong (every task's eval inputs, for the base and for each brick)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from composer.testbed import greedy_answers

    pairs = [pair for task in small_testbed.tasks.values() for pair in task.eval_set]
    models = {"base": LlamaForCausalLM.from_pretrained(small_testbed.base_dir)}
    for name, task in small_testbed.tasks.items():
        models[name] = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(small_testbed.base_dir), task.brick_dir
        )
    scores = []
    for name, model in models.items():
        model.eval()
        answers = greedy_answers(model, [text for text, _ in pairs], max_new_tokens=max(len(a) for _, a in pairs) + 2)
        decoded = sum(got == want for got, (_, want) in zip(answers, pairs, strict=True)) / len(pairs)
        assert exact_match(model, pairs) == decoded, name
        assert exact_match(model, pairs, batch=7) == decoded, name  # and whatever the batches
        scores.append(decoded)
    assert min(scores[1:]) > 0 and max(scores) < 1  # each brick does its task, not the others


class _BaseTrained(Exception):
    pass


def test_the_base_trains_with_its_recipes_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base trains with the recipe's thread count (the full variant's: 2), whatever the
    caller's; the caller's count is back afterwards, and a failed build leaves nothing."""
    import torch

    seen: list[int] = []

    def record_threads(*_args: object) -> None:
        seen.append(torch.get_num_threads())
        raise _BaseTrained

    monkeypatch.setattr(composer.testbed, "_trained_base", record_threads)
    monkeypatch.setitem(composer.testbed.VARIANTS, "small", dataclasses.replace(VARIANTS["small"], base_threads=3))
    before = torch.get_num_threads()
    with pytest.raises(_BaseTrained):
        build_testbed(tmp_path / "bed", seed=0, variant="small")
    assert seen == [3]
    assert torch.get_num_threads() == before
    assert list(tmp_path.iterdir()) == []


# -- shipped builds (a copy of the session's small build, shipped the way `ship_testbed` does) --


def _ship_as(bed: TestBed, shipped: Path) -> Path:
    """A copy of ``bed`` laid out and hashed the way `ship_testbed` ships a build."""
    target = shipped / f"{bed.variant}-seed{bed.seed}"
    shutil.copytree(bed.root, target)
    (target / "files.sha256").unlink(missing_ok=True)
    write_hash_list(target)
    return target


def test_ensure_testbed_installs_a_shipped_build_without_training(
    small_testbed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = _ship_as(small_testbed, tmp_path / "shipped")
    monkeypatch.setattr(composer.testbed, "SHIPPED", tmp_path / "shipped")

    def no_training(*_args: object, **_kwargs: object) -> TestBed:
        raise AssertionError("ensure_testbed trained although a build is shipped")

    monkeypatch.setattr(composer.testbed, "build_testbed", no_training)
    assert shipped_root("small", 0) == shipped
    bed = ensure_testbed(tmp_path / "cache", seed=0, variant="small")
    assert bed.root.parent == tmp_path / "cache"
    assert file_hashes(bed.root) == read_hashes(shipped) == file_hashes(small_testbed.root)
    assert ensure_testbed(tmp_path / "cache", seed=0, variant="small").root == bed.root


def test_a_changed_shipped_file_is_refused(
    small_testbed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = _ship_as(small_testbed, tmp_path / "shipped")
    monkeypatch.setattr(composer.testbed, "SHIPPED", tmp_path / "shipped")
    weights = shipped / "bricks" / "parity" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape("bricks/parity/adapter_model.safetensors")):
        ensure_testbed(tmp_path / "cache", seed=0, variant="small")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-installed


def test_a_shipped_build_of_other_code_is_not_used(
    small_testbed: TestBed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build shipped by another code version is stale: ensure_testbed trains instead."""
    shipped = _ship_as(small_testbed, tmp_path / "shipped")
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["code_version"] = "0" * 12
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(composer.testbed, "SHIPPED", tmp_path / "shipped")
    trained: list[str] = []

    def recorded(out_dir: Path, **kwargs: object) -> TestBed:
        trained.append(str(kwargs["variant"]))
        shutil.copytree(small_testbed.root, out_dir)
        return load_testbed(out_dir)

    monkeypatch.setattr(composer.testbed, "build_testbed", recorded)
    bed = ensure_testbed(tmp_path / "cache", seed=0, variant="small")
    assert trained == ["small"]
    assert bed.code_version == code_version("small")


def test_saved_tokenizer_gives_the_training_ids(small_testbed: TestBed) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_testbed.base_dir)
    for task in small_testbed.tasks.values():
        text, answer = task.eval_set[0]
        ids, prompt_length = encode_example(format_prompt(text), answer)
        prompt_ids = tokenizer(format_prompt(text))["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert prompt_ids == ids[:prompt_length]
        assert [*prompt_ids, *answer_ids, tokenizer.eos_token_id] == ids
        assert tokenizer.decode(answer_ids) == answer


def test_ensure_testbed_reuses_the_cached_build(small_testbed: TestBed) -> None:
    manifest = small_testbed.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = ensure_testbed(small_testbed.root.parent, seed=small_testbed.seed, variant="small")
    assert again.root == small_testbed.root
    assert manifest.stat().st_mtime_ns == before


def test_bricks_record_the_base_by_its_stable_name(small_testbed: TestBed) -> None:
    """Not the staging directory the build trained in (gone once published): the name the
    manifest gives the base, the same on every machine and cache path."""
    import json

    assert small_testbed.base_name == base_name(small_testbed.variant, small_testbed.seed)
    for task in small_testbed.tasks.values():
        config = json.loads((task.brick_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == small_testbed.base_name, task.name


# -- worker processes ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for its reaper has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_brick_workers_end_when_the_build_process_is_killed(tmp_path: Path) -> None:
    """Workers of the pool bricks train in, busy in a job, end with a killed parent instead of
    working on for nobody. Each job writes its worker's pid, then works for an hour."""
    job = f"import os, pathlib, time; pathlib.Path({str(tmp_path)!r}, str(os.getpid())).touch(); time.sleep(3600)"
    script = (
        "from composer.testbed import _brick_pool\n"
        "with _brick_pool(2) as pool:\n"
        f"    jobs = [pool.submit(exec, {job!r}) for _ in range(2)]\n"
        "    jobs[0].result()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers: list[int] = []
    try:
        _wait_until(lambda: len(list(tmp_path.iterdir())) == 2 or parent.poll() is not None, 300, "both jobs running")
        assert parent.poll() is None, "the build process ended by itself"
        workers = [int(path.name) for path in tmp_path.iterdir()]
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
        _wait_until(lambda: not any(_alive(pid) for pid in workers), 120, "the workers ended")
    finally:
        parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
