"""seeds.py: the interval over seeds, the table and the plot (from rows shaped as seed_result's)."""
import json

import pytest

import seeds


def test_mean_interval_hand_computed():
    # mean 0.2, sd 0.1, t(0.95, 2 df) = 2.920: half width 2.920 * 0.1 / sqrt(3) = 0.16858
    m, lo, hi = seeds.mean_interval([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - 0.16858, abs=1e-4)
    assert hi == pytest.approx(0.2 + 0.16858, abs=1e-4)
    assert seeds.mean_interval([0.4]) == (0.4, 0.4, 0.4)


def test_table_and_plot_from_seed_rows(tmp_path):
    rows = [{"seed": s, "warmup": 0.1, "gigpo": 0.1 + s / 100, "siri": 0.2, "siri_random": 0.1,
             "siri-gigpo": (0.1 - s / 100, -0.05, 0.2), "siri_random-gigpo": (0.0, -0.1, 0.1)} for s in range(3)]
    text = seeds.write_table(rows, tmp_path)
    assert "| SIRI (Phases 1-2) | 0.200 | [0.200, 0.200] | 0.200, 0.200, 0.200 |" in text
    assert "| siri − gigpo | +0.090 |" in text and "+0.100 [-0.050, +0.200]" in text
    assert json.loads((tmp_path / "seeds.json").read_text())[2]["gigpo"] == pytest.approx(0.12)
    seeds.plot(rows, tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 1000


def test_seeds_refuses_the_keys_it_sets():
    with pytest.raises(SystemExit, match="sets run.seed"):
        seeds.main(["--seeds", "2", "run.seed=3"])


def test_seeds_after_the_first_start_from_its_cold_started_model(tmp_path):
    first = tmp_path / "seed_0" / "coldstart_model"
    assert not any(a.startswith("model.name=") for a in seeds.seed_overrides(tmp_path, 1, ["x.y=1"], "shared"))
    first.mkdir(parents=True)
    (first / "COMPLETE").write_text("")
    args = seeds.seed_overrides(tmp_path, 1, ["x.y=1"], "shared")
    assert args[0] == "x.y=1" and f"run.out_dir={tmp_path / 'seed_1'}" in args and "run.seed=1" in args
    assert args[-2:] == [f"model.name={first.resolve()}", "coldstart.enabled=off"]
    assert not any(a.startswith("model.name=") for a in seeds.seed_overrides(tmp_path, 0, [], "shared"))
    assert not any(a.startswith("model.name=") for a in seeds.seed_overrides(tmp_path, 2, [], "each"))
