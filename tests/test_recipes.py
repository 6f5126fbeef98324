"""Every shipped recipe loads with mergekit's own config classes and says what it is."""

import os

from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS

from mergekit.config import MergeConfiguration
import nearswap_mergekit
from nearswap_mergekit import check_threshold
from nearswap_mergekit.tools import recipebook

RECIPES = sorted(CONFIGS.glob("*.yml"))


def test_the_package_ships_configs_itself():
    """One copy of each recipe: the package's recipes folder is a link to configs/."""
    assert os.path.realpath(Path(nearswap_mergekit.__file__).parent / "recipes") == str(CONFIGS.resolve())
    assert recipebook.names() == sorted(p.stem for p in RECIPES)
    for name, summary in recipebook.catalog().items():
        assert recipebook.text(name) == (CONFIGS / f"{name}.yml").read_text()
        assert summary and len(summary) <= 100 and not summary.startswith("#")
    with pytest.raises(KeyError, match="no recipe called 'nope'; the recipes are: boreangale, "):
        recipebook.text("nope")
CARD_CHAIN = [
    "Sao10K/WinterGoddess-1.4x-70B-L2",
    "sophosympatheia/Aurora-Nights-70B-v1.0",
    "Xwin-LM/Xwin-LM-70B-V0.1",
]


def documents(path: Path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_the_expected_recipes_ship():
    assert {p.name for p in RECIPES} >= {
        "quartet.yml",
        "quartet-multistage.yml",
        "boreangale.yml",
        "demo-quartet.yml",
        "demo-quartet-multistage.yml",
        "demo-boreangale.yml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_starts_with_a_comment(path):
    assert path.read_text().startswith("# ")
    for doc in documents(path):
        doc.pop("name", None)  # mergekit-multi's stage name
        config = MergeConfiguration.model_validate(doc)
        if "tokenizer" in doc:  # mergekitty refuses `tokenizer:` beside its default source
            assert "tokenizer_source" in doc and doc["tokenizer_source"] is None
        assert config.merge_method == "nearswap_chain"
        assert config.base_model is not None and config.models
        assert check_threshold(config.parameters["t"]) > 0


def secondaries(doc):
    return [str(m["model"]) for m in doc["models"]]


def test_quartet_follows_the_card():
    (doc,) = documents(CONFIGS / "quartet.yml")
    assert doc["base_model"] == "152334H/miqu-1-70b-sf"
    assert secondaries(doc) == CARD_CHAIN
    assert doc["parameters"]["t"] == 0.0001 and doc["dtype"] == "float16"
    assert doc["tokenizer"]["source"] == "base"
    stages = documents(CONFIGS / "quartet-multistage.yml")
    assert [secondaries(s) for s in stages] == [[m] for m in CARD_CHAIN]
    assert [s["base_model"] for s in stages] == [
        "152334H/miqu-1-70b-sf",
        "quartet-stage1",
        "quartet-stage2",
    ]
    assert all(s["parameters"]["t"] == 0.0001 and s["dtype"] == "float16" for s in stages)


def test_boreangale_is_one_stage_at_0_001():
    (doc,) = documents(CONFIGS / "boreangale.yml")
    assert doc["base_model"] == "152334H/miqu-1-70b-sf"
    assert secondaries(doc) == CARD_CHAIN[:1] and doc["parameters"]["t"] == 0.001
