"""Where a run computes and what it records about the software it ran with."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

from collapse_utils.training import environment


def test_package_versions_name_a_package_imported_from_a_checkout_instead_of_failing(
    monkeypatch,
):
    real = environment.version

    def version(name: str) -> str:
        if name == "collapse_utils":  # on PYTHONPATH, never pip-installed
            raise PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(environment, "version", version)
    versions = environment.package_versions()
    assert versions["collapse_utils"] == "not installed"
    assert versions["torch"] == real("torch") and versions["python"]
