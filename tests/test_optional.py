"""A missing optional package is named with the extra that installs it (chapter 0)."""
import sys

import pytest

from merging_helpers import optional


@pytest.mark.parametrize("module, pip_name, extra", [("peft", "peft", "colab"), ("scipy.stats", "scipy", "colab"),
                                                     ("mathematics_dataset", "mathematics-dataset", "data")])
def test_a_missing_package_names_pip_and_the_extra(monkeypatch, module, pip_name, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError, match=rf"the thing needs the package '{pip_name}', which is not installed: "
                                          rf"`pip install {pip_name}` \(or `pip install 'merging_helpers\[{extra}\]'`\)"):
        optional.require(module, "the thing")


def test_an_installed_package_is_returned():
    assert optional.require("json", "x") is sys.modules["json"]


def test_the_lora_tier_says_which_extra_brings_peft(monkeypatch):
    from merging_helpers import zoo
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"a LoRA tier .* needs the package 'peft'.*merging_helpers\[colab\]"):
        zoo.with_lora(None, zoo.LORA)


def test_every_optional_package_is_in_the_extra_it_names():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for module, (pip_name, extra) in optional.OPTIONAL.items():
        listed = " ".join(extras[extra]).lower()
        assert pip_name.split("==")[0].lower() in listed, (module, extra)
