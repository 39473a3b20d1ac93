"""Errors and exit codes live in one module: processor.errors."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil

import processor
from processor import errors
from processor.errors import ExitCode


def _modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(processor.__path__, prefix="processor.")
        if info.name not in ("processor.__main__", errors.__name__)
    ]


def test_every_exception_class_of_the_package_is_defined_in_errors():
    elsewhere = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                elsewhere.append(f"{name}.{value.__name__}")
    assert elsewhere == []


def test_every_exception_in_errors_says_when_it_is_raised():
    classes = [
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, BaseException) and value.__module__ == errors.__name__
    ]
    assert classes
    for value in classes:
        doc = inspect.getdoc(value) or ""
        assert doc.startswith(("Raised ", "Base class")), value.__name__


def test_no_module_but_errors_defines_an_exit_code():
    found = []
    for name in _modules():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        with open(spec.origin, encoding="utf-8") as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                found += [
                    f"{name}.{target.id}"
                    for target in node.targets
                    if isinstance(target, ast.Name) and target.id.startswith("EXIT_")
                ]
    assert found == []


def test_exit_codes_keep_their_values():
    assert {name: int(code) for name, code in ExitCode.__members__.items()} == {
        "OK": 0,
        "UNREACHABLE": 1,
        "CONSUMER_ERROR": 1,
        "CONFIG": 2,
        "FORCED": 3,
        "STARTUP_TIMEOUT": 4,
        "NO_CONSUMER": 5,
        "NOT_REPLAYED": 6,
        "INTERRUPTED": 130,
        "TERMINATED": 143,
    }
