"""The libyaml parser (when PyYAML has it) and the pure-Python one give the same values and positions, and
errors always carry the pure-Python loader's messages."""

from __future__ import annotations

import pytest
import yaml

from vmform.manifest import yamlsource

TEXTS = [
    "domains:\n  web: {memory: 1GiB, vcpus: 2}\n",
    "base: &base {memory: 1GiB}\ndomains:\n  web:\n    <<: *base\n    vcpus: 2\n",
    "domains:\n  wéb:\n    description: 'ünïcode — text'\n    disks:\n      - {volume: a}\n      - {volume: b}\n",
    "networks: {}\n---\npools:\n  p: {type: dir, path: /x}\n",
    "a: 1\na: 2\n",  # a duplicate key: reported by vmform's converter, at the same position both ways
]


@pytest.mark.skipif(not hasattr(yaml, "CSafeLoader"), reason="PyYAML built without libyaml")
@pytest.mark.parametrize("text", TEXTS)
def test_both_parsers_agree(text: str) -> None:
    def load(loader: type, fast: bool) -> object:
        documents, errors = yamlsource._load_with(loader, text, "m.yaml", fast=fast)
        return ([(d.data, d.source.values, d.source.keys) for d in documents],
                [(e.message, e.position) for e in errors])

    assert load(yaml.CSafeLoader, True) == load(yaml.SafeLoader, False)


def test_syntax_errors_carry_the_pure_python_message() -> None:
    text = "domains:\n  web: {memory: 1GiB, vcpus: [2\n"
    _, errors = yamlsource.load_yaml(text, "m.yaml")
    _, expected = yamlsource._load_with(yaml.SafeLoader, text, "m.yaml", fast=False)
    assert [(e.message, e.position) for e in errors] == [(e.message, e.position) for e in expected]
    assert errors and "YAML syntax error" in errors[0].message
