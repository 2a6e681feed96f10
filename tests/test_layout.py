"""The package's layout: size limits and no import circle (scripts/code_layout.py)."""

from pathlib import Path

from tests.conftest import load_script

layout = load_script("code_layout")


def test_no_import_circle_in_the_package():
    assert layout.import_circles(layout.PACKAGE) == []


def test_no_module_class_or_function_past_its_limit():
    over = {kind: [item for item in items if item[0] > layout.LIMITS[kind]]
            for kind, items in layout.sizes(layout.PACKAGE).items()}
    assert over == {"module": [], "class": [], "function": []}


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_a_circle_is_found_through_every_kind_of_import(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg import b\n",  # a submodule named in `from package import`
        "b.py": "def f():\n    from .sub.c import g\n",  # relative, inside a function
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",  # a dotted `import`
        "d.py": "import pkg.b\n",  # imports into the circle, is not part of it
    })
    assert layout.import_circles(package) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_type_checking_imports_and_one_way_imports_are_no_circle(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "from pkg.a import x\nimport os\n",
    })
    assert layout.import_circles(package) == []
    package = write_package(tmp_path / "two", {
        "a.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import pkg.b\n",
        "b.py": "from pkg.a import x\n",
    })
    assert layout.import_circles(package) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_sizes_count_whole_definitions(tmp_path):
    package = write_package(tmp_path, {
        "m.py": "class C:\n    def f(self):\n        return 1\n\n\ndef g():\n    pass\n"})
    found = layout.sizes(package)
    assert found["module"][0] == (7, "pkg.m")
    assert found["class"] == [(3, "pkg.m.C")]
    assert found["function"] == [(2, "pkg.m.g"), (2, "pkg.m.C.f")]  # longest first, then by name
