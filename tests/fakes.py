"""Stand-ins for parts of the environment a test must not depend on."""
import importlib


def hide_package(monkeypatch, package: str) -> None:
    """Make `importlib.import_module(package)` fail as it does when the package is not installed
    (how the engine imports optional attention packages), whatever is installed here."""
    real = importlib.import_module

    def fake(name, *args):
        if name == package:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
