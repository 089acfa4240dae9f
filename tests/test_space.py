"""Search-space YAML validation: the shipped spaces load, and mistakes are named in one-line
errors."""

from pathlib import Path

import pytest
import yaml

from fer.core.errors import UserError
from study.space import load_space, parse_space
from study.tune.search import BackboneSearcher, optuna_distributions

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

BASE = {
    "name": "t",
    "metric": "val_loss",
    "mode": "min",
    "backbones": ["mobilenet025", "mobilenetv2"],
    "trials_per_backbone": 3,
    "scheduler": {"type": "asha", "grace_period": 1},
    "fixed": {"image_size": 32, "weights": "none", "epochs_head": 1, "epochs_finetune": 1},
    "space": {
        "dropout": {"uniform": [0.1, 0.6]},
        "unfreeze_layers": {"int": [0, 30]},
        "lr_head": {"loguniform": [1e-4, 3e-3]},
    },
    "start_points": [{"dropout": 0.53, "unfreeze_layers": 30, "lr_head": 1e-3}],
}


def with_(**changes):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("name", ["paper", "default", "smoke", "jaffe-small", "fer2013-cpu"])
def test_shipped_spaces_load(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.trials_per_backbone >= 1 and space.backbones
    for (
        backbone
    ) in space.backbones:  # every start point makes a valid trial config for every backbone
        for point in space.start_points:
            assert space.config_for(backbone, point)["backbone"] == backbone


def test_paper_space_is_the_published_setting_once_per_backbone():
    space = load_space(SPACES / "paper.yaml")
    assert space.trials_per_backbone == 1 and not space.space
    assert set(space.backbones) == {
        "efficientnetb1",
        "resnet50",
        "inceptionv3",
        "mobilenetv2",
        "densenet121",
    }
    config = space.config_for("resnet50", {})
    assert (
        config["dropout"],
        config["unfreeze_layers"],
        config["lr_head"],
        config["lr_finetune"],
    ) == (
        0.53,
        30,
        1e-3,
        1e-4,
    )


def test_valid_space_round_trips_and_max_epochs():
    space = parse_space(with_())
    assert parse_space(space.to_dict()) == parse_space(with_())
    assert space.max_epochs() == 2
    assert space.start_points[0]["unfreeze_layers"] == 30


def test_cached_finetune_trials_cut_at_the_largest_unfreeze_of_the_space():
    """So every trial of a backbone shares one stage-2 cache, whatever unfreeze_layers it draws."""
    fixed = {**BASE["fixed"], "finetune_features": "cached"}
    space = parse_space(with_(fixed=fixed))
    assert space.config_for("mobilenetv2", {"unfreeze_layers": 7})["finetune_cache_units"] == 30
    assert (
        parse_space(with_()).config_for("mobilenetv2", {"unfreeze_layers": 7})[
            "finetune_cache_units"
        ]
        == 0
    )
    pinned = parse_space(with_(fixed={**fixed, "finetune_cache_units": 40}))
    assert pinned.config_for("mobilenetv2", {"unfreeze_layers": 7})["finetune_cache_units"] == 40


@pytest.mark.parametrize(
    "raw, words",
    [
        (with_(colour="red"), ["unknown key 'colour'"]),
        (with_(backbones=["mobilenet025", "vgg99"]), ["unknown backbone 'vgg99'"]),
        (with_(fixed={"image_size": 32, "learning_rate": 0.1}), ["fixed", "'learning_rate'"]),
        (
            with_(space={"dropout": {"uniform": [0.6, 0.1]}}),
            ["space.dropout", "bad range [0.6, 0.1]"],
        ),
        (
            with_(space={"dropout": {"uniform": [0.1, 1.5]}}),
            ["space.dropout", "within [0.0, 0.95]"],
        ),
        (with_(space={"lr_head": {"loguniform": [0.0, 0.1]}}), ["space.lr_head", "low > 0"]),
        (
            with_(space={"unfreeze_layers": {"uniform": [0, 10]}}),
            ["space.unfreeze_layers", "integer"],
        ),
        (
            with_(space={"dropout": {"normal": [0.1, 0.2]}}),
            ["space.dropout", "unknown distribution 'normal'"],
        ),
        (
            with_(space={"backbone": {"choice": ["resnet50"]}}),
            ["'backbone' is set by 'backbones:'"],
        ),
        (with_(space={"speed": {"uniform": [0, 1]}}), ["unknown config key 'speed'"]),
        (
            with_(space={"dropout": {"uniform": [0.1, 0.6]}}, fixed={"dropout": 0.5}),
            ["'dropout' is both fixed"],
        ),
        (
            with_(start_points=[{"dropout": 0.9, "unfreeze_layers": 3, "lr_head": 1e-3}]),
            ["start_points[0]", "'dropout'", "outside"],
        ),
        (
            with_(start_points=[{"dropout": 0.3}]),
            ["start_points[0]", "missing tuned key 'unfreeze_layers'"],
        ),
        (with_(metric="val_auc"), ["metric", "unknown metric 'val_auc'"]),
        (with_(scheduler={"type": "hyperband"}), ["scheduler.type", "'hyperband'"]),
        (
            with_(scheduler={"type": "asha", "grace_period": 5}),
            ["scheduler.grace_period", "exceeds"],
        ),
        (with_(trials_per_backbone=0), ["trials_per_backbone"]),
        (with_(fixed={"image_size": 16}), ["image_size", "16"]),
        (
            with_(fixed={**BASE["fixed"], "tta_flip": 1, "head_features": "cached"}),
            ["tta_flip 1 needs head_features exact"],
        ),
    ],
)
def test_bad_spaces_are_rejected_naming_the_key(raw, words):
    with pytest.raises(UserError) as info:
        parse_space(raw, source="bad.yaml")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_load_space_errors_for_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="search space not found"):
        load_space(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("backbones: [resnet50\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(broken)


def test_cli_reports_a_bad_space_in_one_line(tmp_path):
    from click.testing import CliRunner

    from study.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_(backbones=["vgg99"])))
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, ["run", str(tmp_path / "data"), "--space", str(bad)])
    assert result.exit_code == 2
    assert "unknown backbone 'vgg99'" in result.output and "Traceback" not in result.output


def test_searcher_gives_every_backbone_the_same_budget_start_points_first(tmp_path):
    import optuna

    space = parse_space(with_())
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    searcher = BackboneSearcher(space, {"mobilenet025": 3, "mobilenetv2": 3}, storage)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert searcher.suggest("t6") == searcher.FINISHED
    assert [c["backbone"] for c in configs].count("mobilenet025") == 3
    firsts = {c["backbone"]: c for c in configs[:2]}
    assert set(firsts) == {"mobilenet025", "mobilenetv2"}
    for config in firsts.values():  # the start point is evaluated first, for each backbone
        assert (config["dropout"], config["unfreeze_layers"], config["lr_head"]) == (0.53, 30, 1e-3)
        assert (
            config["image_size"] == 32 and config["weights"] == "none"
        )  # fixed keys are in every config
    assert set(optuna_distributions(space)) == {"dropout", "unfreeze_layers", "lr_head"}


def per_backbone(**settings):
    return with_(per_backbone=settings)


def test_per_backbone_settings_override_fixed_and_space(tmp_path):
    """Each backbone its own image size, weights file and learning-rate range; the rest stays
    shared."""
    weights = tmp_path / "mnv2.h5"
    weights.write_bytes(b"x")
    space = parse_space(
        per_backbone(
            mobilenetv2={
                "image_size": 64,
                "weights": str(weights),
                "lr_head": {"loguniform": [1e-4, 1e-3]},
                "unfreeze_layers": 12,
            },
        )
    )
    assert parse_space(space.to_dict()) == space  # study.json round trip (resume compares it)
    small = space.config_for(
        "mobilenet025", {"dropout": 0.3, "unfreeze_layers": 7, "lr_head": 2e-3}
    )
    assert (small["image_size"], small["weights"]) == (32, "none")
    assert set(space.space_for("mobilenet025")) == {"dropout", "unfreeze_layers", "lr_head"}
    assert set(space.space_for("mobilenetv2")) == {
        "dropout",
        "lr_head",
    }  # unfreeze_layers fixed for it
    assert space.space_for("mobilenetv2")["lr_head"].args == (1e-4, 1e-3)
    assert space.start_points_for("mobilenetv2") == ({"dropout": 0.53, "lr_head": 1e-3},)
    big = space.config_for("mobilenetv2", space.start_points_for("mobilenetv2")[0])
    assert (big["image_size"], big["weights"], big["unfreeze_layers"]) == (
        64,
        str(weights.resolve()),
        12,
    )
    assert space.image_sizes("mobilenetv2") == [64] and space.image_sizes("mobilenet025") == [32]
    assert set(optuna_distributions(space, "mobilenetv2")) == {"dropout", "lr_head"}


def test_per_backbone_cache_cut_and_epochs_are_each_backbones_own():
    """finetune_cache_units = the largest unfreeze_layers THIS backbone's trials can use; ASHA's
    max_t per backbone."""
    fixed = {**BASE["fixed"], "finetune_features": "cached"}
    space = parse_space(
        with_(
            fixed=fixed,
            start_points=[],
            per_backbone={
                "mobilenetv2": {"unfreeze_layers": {"int": [0, 8]}, "epochs_finetune": 5},
                "mobilenet025": {"unfreeze_layers": 4},
            },
        )
    )
    assert space.config_for("mobilenetv2", {"unfreeze_layers": 3})["finetune_cache_units"] == 8
    assert space.config_for("mobilenet025", {})["finetune_cache_units"] == 4
    assert (
        space.max_epochs("mobilenetv2"),
        space.max_epochs("mobilenet025"),
        space.max_epochs(),
    ) == (6, 2, 6)
    from study.tune.search import PerBackboneScheduler

    scheduler = PerBackboneScheduler(space)
    assert (  # one above each backbone's fine-tune epochs (its rung clock)
        scheduler.schedulers["mobilenetv2"]._max_t == 6
        and scheduler.schedulers["mobilenet025"]._max_t == 2
    )


def test_searcher_draws_each_backbone_from_its_own_range(tmp_path):
    import optuna

    space = parse_space(
        with_(
            trials_per_backbone=4,
            start_points=[],
            per_backbone={
                "mobilenetv2": {"lr_head": {"loguniform": [1e-6, 1e-5]}, "image_size": 48}
            },
        )
    )
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    searcher = BackboneSearcher(space, {"mobilenet025": 4, "mobilenetv2": 4}, storage)
    configs = [searcher.suggest(f"t{i}") for i in range(8)]
    for config in configs:
        if config["backbone"] == "mobilenetv2":
            assert 1e-6 <= config["lr_head"] <= 1e-5 and config["image_size"] == 48
        else:
            assert config["lr_head"] >= 1e-4 and config["image_size"] == 32


def test_weights_path_from_an_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.h5").write_bytes(b"x")
    monkeypatch.setenv("FER_TEST_SHARED", str(tmp_path))
    space = parse_space(per_backbone(mobilenetv2={"weights": "${FER_TEST_SHARED}/w/a.h5"}))
    assert space.config_for("mobilenetv2", {})["weights"] == str(tmp_path / "w" / "a.h5")
    monkeypatch.delenv("FER_TEST_SHARED")
    monkeypatch.chdir(tmp_path)  # the default, relative to the current directory, made absolute
    space = parse_space(per_backbone(mobilenetv2={"weights": "${FER_TEST_SHARED:-.}/w/a.h5"}))
    assert space.config_for("mobilenetv2", {})["weights"] == str(tmp_path / "w" / "a.h5")


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"vgg99": {"image_size": 64}}, ["per_backbone", "unknown backbone 'vgg99'"]),
        (
            {"resnet50": {"image_size": 64}},
            ["per_backbone", "'resnet50' is not one of the study's backbones"],
        ),
        (
            {"mobilenetv2": {"colour": 1}},
            ["per_backbone.mobilenetv2", "unknown config key 'colour'"],
        ),
        (
            {"mobilenetv2": {"image_size": "big"}},
            ["per_backbone.mobilenetv2", "'image_size'", "'big'"],
        ),
        ({"mobilenetv2": {"image_size": 16}}, ["per_backbone.mobilenetv2", "'image_size'", "16"]),
        (
            {"mobilenetv2": {"weights": "/no/such/file.h5"}},
            ["per_backbone.mobilenetv2.weights", "not found"],
        ),
        (
            {"mobilenetv2": {"weights": "${FER_NO_SUCH_VAR}/x.h5"}},
            ["per_backbone.mobilenetv2.weights", "FER_NO_SUCH_VAR is not set"],
        ),
        (
            {"mobilenetv2": {"epochs_head": {"int": [1, 3]}}},
            ["per_backbone.mobilenetv2.epochs_head", "not tuned"],
        ),
        (
            {"mobilenetv2": {"dropout": {"uniform": [0.6, 0.7]}}},
            ["start_points[0]", "mobilenetv2's distribution"],
        ),
        (
            {"mobilenetv2": {"dropout": 0.5, "unfreeze_layers": 3, "lr_head": 1e-3}},
            ["per_backbone.mobilenetv2", "nothing to tune"],
        ),
        (
            {"mobilenetv2": {"epochs_head": 0, "epochs_finetune": 0}},
            ["per_backbone.mobilenetv2", "is 0"],
        ),
        ({"mobilenetv2": []}, ["per_backbone.mobilenetv2", "expected a mapping"]),
        ({"mobilenetv2": {"backbone": "resnet50"}}, ["'backbone' is set by 'backbones:'"]),
    ],
)
def test_bad_per_backbone_settings_are_rejected_naming_the_key(settings, words):
    with pytest.raises(UserError) as info:
        parse_space(per_backbone(**settings), source="bad.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.yaml"), message
    for word in words:
        assert word in message, message


def test_each_backbone_checked_against_its_own_minimum_size():
    raw = with_(
        backbones=["mobilenet025", "inceptionv3"], per_backbone={"inceptionv3": {"image_size": 64}}
    )
    with pytest.raises(
        UserError, match=r"per_backbone.inceptionv3.image_size: 64 is below inceptionv3's minimum"
    ):
        parse_space(raw)
    raw["per_backbone"]["inceptionv3"]["image_size"] = 80
    assert parse_space(raw).image_sizes("inceptionv3") == [
        80
    ]  # the fixed 32 applies to mobilenet025 only


def test_a_backbone_may_have_its_own_start_points():
    """Where its range excludes the shared start point (a from-scratch CNN's learning rate vs a
    pretrained one)."""
    own = {
        "lr_head": {"loguniform": [1e-2, 1e-1]},
        "start_points": [{"dropout": 0.2, "unfreeze_layers": 3, "lr_head": 0.05}],
    }
    space = parse_space(per_backbone(mobilenetv2=own))
    assert space.start_points_for("mobilenetv2") == (
        {"dropout": 0.2, "unfreeze_layers": 3, "lr_head": 0.05},
    )
    assert space.start_points_for("mobilenet025") == space.start_points
    assert parse_space(space.to_dict()) == space
    for points, words in (
        ([{"dropout": 0.2, "unfreeze_layers": 3}], "missing tuned key 'lr_head'"),
        ([{"dropout": 0.2, "unfreeze_layers": 3, "lr_head": 1e-3}], "'lr_head'"),
        ({"dropout": 0.2}, "expected a list"),
    ):
        with pytest.raises(UserError, match="per_backbone.mobilenetv2.start_points") as info:
            parse_space(per_backbone(mobilenetv2={**own, "start_points": points}))
        assert words in str(info.value)


def test_fer2013_cpu_space_trains_three_cnns_from_scratch_with_mirrored_evaluation():
    """The reference study: smallcnn, minixception and vggcnn from scratch at 48 px in one stage
    (the whole network, no cache), selected by val accuracy with test-time mirroring; no weights
    file is needed to load it."""
    space = load_space(SPACES / "fer2013-cpu.yaml")
    # round-robin hand-out in this order: the costliest first, so it has a slot to itself
    assert space.backbones == ("vggcnn", "minixception", "smallcnn")
    assert (space.metric, space.mode) == ("val_accuracy", "max")
    from fer.core.config import make_config
    from fer.model.build import backbone_layers, build_model

    for backbone in space.backbones:
        config = space.config_for(backbone, space.start_points_for(backbone)[0])
        assert (
            config["image_size"],
            config["weights"],
            config["epochs_head"],
            config["head_features"],
            config["finetune_features"],
            config["tta_flip"],
        ) == (48, "none", 0, "exact", "exact", 1)
        model = build_model(make_config(backbone=backbone, image_size=48, weights="none"), 5)
        assert config["unfreeze_layers"] >= len(backbone_layers(model))  # all of it trains


def test_rungs_count_fine_tune_epochs_so_a_head_stage_longer_than_the_grace_period_is_no_warning():
    """Every trial fine-tunes: ASHA's rungs count fine-tune epochs, so no trial is judged on its
    head stage, and a grace period must fit the fine-tune epochs."""
    fixed = {**BASE["fixed"], "epochs_head": 4, "epochs_finetune": 3}
    own = {"mobilenet025": {"epochs_head": 0, "epochs_finetune": 7}}  # one stage
    space = parse_space(
        with_(fixed=fixed, per_backbone=own, scheduler={"type": "asha", "grace_period": 2})
    )
    assert space.warnings() == []
    assert (
        space.rung_clock("mobilenetv2") == "finetune_epoch"
        and space.rung_epochs("mobilenetv2") == 3
    )
    head_only = {**fixed, "epochs_finetune": 0}  # one stage: the global epoch
    assert parse_space(with_(fixed=head_only)).rung_clock("mobilenetv2") == "epoch"
    with pytest.raises(UserError, match="exceeds the 3 fine-tune epochs"):
        parse_space(with_(fixed=fixed, scheduler={"type": "asha", "grace_period": 4}))


def test_the_head_stage_warning_remains_where_epochs_finetune_is_tuned_from_0():
    """Some trials of the backbone do not fine-tune: its rungs count global epochs, so a grace
    period within its head stage still judges trials on head-only accuracy (warned, naming it)."""
    fixed = {k: v for k, v in BASE["fixed"].items() if k != "epochs_finetune"}
    space = {**BASE["space"], "epochs_finetune": {"int": [0, 3]}}
    points = [{**BASE["start_points"][0], "epochs_finetune": 3}]
    raw = with_(
        fixed={**fixed, "epochs_head": 4},
        space=space,
        start_points=points,
        per_backbone={"mobilenet025": {"epochs_head": 0}},
        scheduler={"type": "asha", "grace_period": 3},
    )
    (warning,) = parse_space(raw).warnings()
    assert "mobilenetv2 (4)" in warning and "mobilenet025" not in warning
    assert "grace_period" in warning and "epochs_finetune" in warning
    assert parse_space({**raw, "scheduler": {"type": "none"}}).warnings() == []


@pytest.mark.parametrize("name", ["paper", "default", "smoke", "jaffe-small", "fer2013-cpu"])
def test_no_shipped_space_judges_trials_on_head_only_epochs(name):
    """No shipped space triggers the head-stage warning; wherever one has ASHA, every backbone with
    a head stage and a fine-tune stage has its rungs counted in fine-tune epochs."""
    space = load_space(SPACES / f"{name}.yaml")
    assert space.warnings() == []
    if space.scheduler["type"] == "asha":
        for backbone in space.backbones:
            if int(space.largest("epochs_finetune", backbone)) > 0:
                assert space.rung_clock(backbone) == "finetune_epoch"
