"""The planner: its choice on a model where the best plan is known by construction, its pruning,
its Pareto front, the reuse of stored measurements, budgets as the user writes them, and the
`optimize` run that plans (every file of the output folder)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from compiler.budget import Budget, parse_budget
from compiler.cache import Store
from compiler.calibration import Calibration
from compiler.capture import capture_export
from compiler.cli import main
from compiler.errors import UserInputError
from compiler.planner import Candidate, Plan, Planner, Setting
from compiler.targets import load_target
from tests.models import VOCAB

LAYERS = 6
DEAD = (2, 4)  # attention sublayers whose output projection is zero: skipping them changes nothing
COUNTS = ({"kind": "attention", "count": 1}, {"kind": "attention", "count": 2}, {"kind": "attention", "count": 3})


def _model() -> torch.nn.Module:
    """A 6-layer Llama whose attention in layers 2 and 4 adds exactly zero to the residual
    stream, and whose other attention layers matter (output projections scaled up, so that
    removing one moves next-token choices)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in DEAD:
                layer.self_attn.o_proj.weight.zero_()
            else:
                layer.self_attn.o_proj.weight.mul_(40.0)
                layer.self_attn.v_proj.weight.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _model()
    gen = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, VOCAB, (1, 32), generator=gen) for _ in range(3)]
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    captured = capture_export(model, (), batches[0], dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=2, max=128)}, "attention_mask": {1: torch.export.Dim("seq", min=2, max=128)}})
    calibration = Calibration(lambda window, count: batches[:count], name="random windows").with_flatten(captured.flatten_example)
    return model, captured, calibration


def _planner(calibration, store, budget="agreement:100%", **kw) -> Planner:
    return Planner("host", budget, calibration, length=64, families={"layer_skip": COUNTS}, quality_length=32, quality_count=3, store=store, progress=False, say=lambda msg: None, **kw)


def test_planner_chooses_the_known_best_plan(setup, tmp_path):
    # Skipping the two dead attention sublayers is free (identical logits, agreement exactly 1);
    # a third costs agreement. With agreement:100%, the best plan is exactly count=2, and the
    # similarity ranking puts the dead layers first (cosine 1).
    _, captured, calibration = setup
    plan = _planner(calibration, Store(tmp_path / "store.sqlite")).plan(captured.gm)
    by_count = {dict(c.settings[0].options)["count"] if c.settings else 0: c for c in plan.candidates}
    assert plan.chosen is by_count[2]
    assert plan.chosen.stats["layer_skip"]["skipped"] == [f"attention{i}" for i in sorted(DEAD)] or sorted(plan.chosen.stats["layer_skip"]["skipped"]) == sorted(f"attention{i}" for i in DEAD)
    assert by_count[2].quality["ppl_increase"] == pytest.approx(0.0, abs=1e-9) and by_count[2].quality["top1_agreement"] == 1.0
    assert by_count[3].status == "over budget" and by_count[3].quality["top1_agreement"] < 1.0
    # fewer attention layers, less predicted time: 3 < 2 < 1 < 0 skipped
    times = [by_count[n].predicted_seconds for n in (3, 2, 1, 0)]
    assert times == sorted(times) and len(set(times)) == 4
    # count=1, the family's mildest setting, is measured first (it screens the family) and fits,
    # but the chosen plan is faster
    assert by_count[1].status == "fits" and by_count[1].quality["top1_agreement"] == 1.0 and "slower than" in by_count[1].reason
    # the chosen plan's pipeline runs exactly that skip
    pipeline = plan.pipeline()
    skip = next(p for p in pipeline.passes if p.name == "layer_skip")
    assert skip.count == 2 and skip.kind == "attention"
    assert plan.as_dict()["chosen"]["label"] == "layer_skip(count=2, kind=attention)"


def test_a_looser_budget_takes_the_faster_plan(setup, tmp_path):
    _, captured, calibration = setup
    plan = _planner(calibration, Store(tmp_path / "store.sqlite"), budget="ppl:+1000000%").plan(captured.gm)
    assert plan.chosen.settings and dict(plan.chosen.settings[0].options)["count"] == 3


def test_lossless_budget_plans_nothing(setup, tmp_path):
    _, captured, calibration = setup
    plan = _planner(calibration, Store(tmp_path / "store.sqlite"), budget="lossless").plan(captured.gm)
    assert plan.chosen.settings == () and len(plan.candidates) == 1 and plan.chosen.status == "baseline"


def test_a_rerun_reuses_every_stored_measurement(setup, tmp_path, monkeypatch):
    _, captured, calibration = setup
    store = Store(tmp_path / "store.sqlite")
    first = _planner(calibration, store).plan(captured.gm)

    def no_build(*args, **kwargs):
        raise AssertionError("a warm rerun must not rebuild or re-measure a candidate")

    monkeypatch.setattr(Planner, "build", no_build)
    second = _planner(calibration, store).plan(captured.gm)
    assert second.chosen.label == first.chosen.label
    assert all(c.cached for c in second.candidates if c.quality is not None or c.predicted_seconds is not None)
    assert [c.as_dict()["calibration_quality"] for c in second.candidates] == [c.as_dict()["calibration_quality"] for c in first.candidates]
    # a different length is a different question: nothing stored for it
    monkeypatch.undo()
    third = Planner("host", "agreement:100%", calibration, length=96, families={"layer_skip": COUNTS}, quality_length=32, quality_count=3, store=store, progress=False, say=lambda m: None).plan(captured.gm)
    assert not any(c.cached for c in third.candidates)


def test_a_family_whose_mildest_setting_fails_is_dropped_unbuilt(setup, tmp_path, monkeypatch):
    # Unified skipping of one attention sublayer takes attention3, which matters (its output is
    # scaled up), so at agreement:100% the mildest setting fails: it is built and measured once;
    # the harsher setting is never built
    _, captured, calibration = setup
    built = []
    build = Planner.build

    def counting(self, gm, settings):
        built.append(tuple(s.label for s in settings))
        return build(self, gm, settings)

    monkeypatch.setattr(Planner, "build", counting)
    unified = ({"kind": "attention", "method": "unified", "count": 1}, {"kind": "attention", "method": "unified", "count": 3})
    plan = Planner("host", "agreement:100%", calibration, length=64, families={"layer_skip": unified}, quality_length=32, quality_count=3,
                   store=Store(tmp_path / "store.sqlite"), progress=False, say=lambda m: None).plan(captured.gm)
    mild, harsh = plan.candidates[1], plan.candidates[2]
    assert plan.chosen is plan.candidates[0]
    assert mild.status == "over budget" and mild.quality["top1_agreement"] < 1.0 and mild.predicted_seconds is not None
    assert harsh.status == "over budget" and harsh.quality is None and harsh.predicted_seconds is None and harsh.reason.startswith("not built")
    assert mild.stats["layer_skip"]["skipped"] == ["attention3"]
    assert sorted(built) == [(), (mild.settings[0].label,)]  # the baseline, priced, and the mildest setting
    assert "mildest setting alone" in plan.excluded["layer_skip"]


def test_a_setting_that_fails_alone_prunes_harsher_combinations():
    planner = Planner.__new__(Planner)
    planner.budget, planner.progress, planner.say = parse_budget("ppl:+2%"), False, lambda m: None

    class NoStore:
        def get(self, ns, key):
            return None

        def put(self, ns, key, value):
            pass

    planner.store = NoStore()
    a = [Setting("sparse_attention", i, (("recall", r),)) for i, r in enumerate((0.99, 0.9))]
    b = [Setting("layer_skip", i, (("count", n),)) for i, n in enumerate((1, 2))]
    base, a0, a1, b0, a0b0, a1b1 = cands = [Candidate(()), Candidate((a[0],)), Candidate((a[1],)), Candidate((b[0],)), Candidate((a[0], b[0])), Candidate((a[1], b[1]))]
    for c, t in zip(cands, (10, 9, 3, 8, 6, 4)):
        c.predicted_seconds, c.predicted_speedup = t, 10 / t
    cost = {a1.key: 0.5, a0b0.key: 0.015, a1b1.key: 0.001, a0.key: 0.0, b0.key: 0.0}
    measured = []
    planner.build = lambda gm, settings: (Candidate(tuple(settings)).key, [])
    planner._reference, planner._reference_outputs = (lambda gm: []), None

    def quality(key, reference):
        measured.append(key)
        return {"ppl_increase": cost[key], "top1_agreement": 0.9, "tokens": 10}

    planner._quality = quality
    chosen = planner._measure(None, cands, "fingerprint")
    # fastest first: a1 fails alone, so a1+b1 (a setting as harsh) is rejected unmeasured even
    # though it would have passed; a0+b0 fits and is chosen; slower ones are never measured
    assert chosen is a0b0 and a0b0.status == "fits"
    assert measured == [a1.key, a0b0.key]
    assert a1b1.status == "over budget" and a1b1.quality is None and "failed the budget alone" in a1b1.reason
    assert a0.quality is None and b0.quality is None and a0.reason.startswith("predicted slower than")


def test_pareto_front_keeps_the_undominated():
    def cand(speedup, ppl):
        c = Candidate((Setting("layer_skip", 0, (("count", speedup),)),))
        c.predicted_speedup, c.predicted_seconds, c.quality = speedup, 1 / speedup, {"ppl_increase": ppl, "top1_agreement": 1.0}
        return c

    cands = [cand(1.1, 0.01), cand(1.2, 0.005), cand(1.3, 0.05), cand(1.25, 0.08)]
    plan = Plan(load_target("host"), Budget("ppl", 0.02), 64, cands[1], cands, {}, 1.0, 1.0, {}, 0.0)
    assert [c.predicted_speedup for c in plan.pareto()] == [1.2, 1.3]


@pytest.mark.parametrize("text, kind, value", [("lossless", "lossless", 0.0), ("ppl:+2%", "ppl", 0.02), ("PPL: 3.5 %", "ppl", 0.035), ("agreement:98%", "agreement", 0.98)])
def test_budget_parsing(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))
    assert parse_budget(str(b)) == b


@pytest.mark.parametrize("text", ["ppl", "ppl:2", "agreement:0%", "agreement:101%", "speed:2x"])
def test_bad_budgets_name_the_forms(text):
    with pytest.raises(UserInputError, match=f"bad budget '{text}'"):
        parse_budget(text)


def test_budget_allows_by_its_own_measure():
    assert Budget("ppl", 0.02).allows(0.019, 0.5) and not Budget("ppl", 0.02).allows(0.021, 1.0)
    assert Budget("agreement", 0.98).allows(5.0, 0.98) and not Budget("agreement", 0.98).allows(0.0, 0.979)
    assert Budget("lossless").allows(0.0, 1.0) and not Budget("lossless").allows(1e-9, 1.0)


def test_planning_needs_calibration_text(setup):
    _, captured, _ = setup
    with pytest.raises(UserInputError, match="calibration"):
        Planner("host", "ppl:+2%", None, length=64, families={"layer_skip": COUNTS}, progress=False).plan(captured.gm)


# -- optimize with a budget: the whole output folder ------------------------------------------------

MODEL_SOURCE = '''\
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight.zero_()
    return m


def _batch(n, seed):
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def example_inputs():
    return _batch(16, 0)


def dynamic_shapes():
    seq = torch.export.Dim("seq", min=2, max=256)
    return {"input_ids": {1: seq}, "attention_mask": {1: seq}}


def calibration_batches(window, count):
    return [_batch(window, 100 + i) for i in range(count)]


def evaluation_sets(window, count):
    return {"text_a": [_batch(window, 200 + i) for i in range(count)], "text_b": [_batch(window, 300 + i) for i in range(count)]}
'''


def test_optimize_with_a_budget_writes_the_whole_folder(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(MODEL_SOURCE)
    out = tmp_path / "out"
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path / "cache"))
    argv = [str(tmp_path / "model.py"), "--target", "host", "--budget", "agreement:100%", "--length", "64", "--families", "layer_skip", "--out", str(out), "--quiet"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, stderr.getvalue()
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "report.md", "report.html", "graph.txt", "kernels", "cost.json", "roofline.png", "pareto.png", "model.onnx"} <= names
    plan = json.loads((out / "plan.json").read_text())
    planner = plan["planner"]
    # the dead attention layer (2) is the one free skip: agreement:100% takes exactly it
    assert planner["chosen"]["passes"] == [{"pass": "layer_skip", "count": 1, "kind": "attention"}]
    assert planner["chosen"]["pass_stats"]["layer_skip"]["skipped"] == ["attention2"]
    assert all(c["status"] in ("baseline", "chosen", "fits", "over budget", "unmeasured") for c in planner["candidates"])
    assert "kv_cache" in planner["excluded_families"]
    # the compiled model's quality on both evaluation sets: identical logits
    for name in ("text_a", "text_b"):
        q = plan["evaluation"]["texts"][name]
        assert q["ppl_increase"] == pytest.approx(0.0, abs=1e-5) and q["top1_agreement"] == 1.0 and q["within_budget"]
    assert plan["speed"]["measured_speedup"] > 0 and plan["speed"]["predicted_speedup"] > 0
    assert plan["onnx"].get("check", {}).get("ok"), plan["onnx"]
    report = (out / "report.md").read_text()
    assert "## Plan" in report and "![Quality against predicted speed](pareto.png)" in report and "## Quality of the chosen plan on evaluation text" in report
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and 'src="pareto.png"' in html
    # warm: the same run again reuses every measurement
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(argv + ["--json"]) == 0
    again = json.loads((out / "plan.json").read_text())
    assert again["evaluation"]["from_cache"] and again["speed"]["from_cache"]
    assert all(c["from_cache"] for c in again["planner"]["candidates"] if c["predicted_seconds"] is not None)
