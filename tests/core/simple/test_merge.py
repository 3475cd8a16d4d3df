"""
Merged pages: the higher member's file kept on a conflict, versions the
union, the project status the most restrictive; merged project lists.
"""

from __future__ import annotations

from txpypi.core.simple.merge import Conflict, merge_lists, merge_pages
from txpypi.core.simple.model import DistFile, ProjectPage
from txpypi.core.simple.projects import ProjectList


def dist(name: str, digest: str | None, where: str) -> DistFile:
    return DistFile(name, f"https://{where}/{name}", {} if digest is None else {"sha256": digest})


def test_the_higher_members_file_is_kept_and_the_conflict_named() -> None:
    high = ProjectPage(
        "torch", (dist("torch-2.0.whl", "aa" * 32, "high"), dist("torch-1.0.whl", "bb" * 32, "high"))
    )
    low = ProjectPage(
        "torch",
        (
            dist("torch-2.0.whl", "cc" * 32, "low"),
            dist("torch-1.0.whl", "bb" * 32, "low"),
            dist("torch-3.0.whl", None, "low"),
        ),
    )
    merged, conflicts = merge_pages("torch", [high, low])
    assert [(f.filename, f.url.split("/")[2]) for f in merged.files] == [
        ("torch-2.0.whl", "high"),
        ("torch-1.0.whl", "high"),
        ("torch-3.0.whl", "low"),
    ]
    # The same hash twice is no conflict; another hash is.
    assert conflicts == [Conflict("torch-2.0.whl", 0, 1)]


def test_a_file_without_a_hash_to_compare_is_a_conflict() -> None:
    high = ProjectPage("x", (dist("x-1.whl", None, "high"),))
    low = ProjectPage("x", (dist("x-1.whl", "aa" * 32, "low"),))
    _, conflicts = merge_pages("x", [high, low])
    assert conflicts == [Conflict("x-1.whl", 0, 1)]


def test_versions_union_and_the_most_restrictive_status() -> None:
    high = ProjectPage("x", (), api_version="1.4", versions=("1.0",), status="active")
    low = ProjectPage(
        "x",
        (dist("x-2.0.tar.gz", None, "low"),),
        api_version="1.1",
        status="quarantined",
        status_reason="malware",
    )
    merged, _ = merge_pages("x", [high, low])
    assert merged.versions == ("1.0", "2.0")
    assert (merged.status, merged.status_reason) == ("quarantined", "malware")
    assert merged.api_version == "1.1"
    neither = merge_pages("x", [ProjectPage("x", ()), ProjectPage("x", ())])[0]
    assert neither.versions is None and neither.status is None


def test_project_lists_are_a_union_by_normalized_name() -> None:
    one = ProjectList.of(["Acme_Lib", "requests"])
    two = ProjectList.of(["acme-lib", "acme-evil", "numpy"])
    merged = merge_lists([one, two], lambda i, name: not (i == 1 and name.startswith("acme-")))
    assert merged.projects == ("Acme_Lib", "requests", "numpy")


def test_pep_708_relations_are_carried_together() -> None:
    high = ProjectPage(
        "x", (), tracks=("https://pypi.org/simple/x/",), alternate_locations=("https://a/simple/x/",)
    )
    low = ProjectPage("x", (), tracks=("https://pypi.org/simple/x/", "https://b/simple/x/"))
    merged, _ = merge_pages("x", [high, low])
    assert merged.tracks == ("https://pypi.org/simple/x/", "https://b/simple/x/")
    assert merged.alternate_locations == ("https://a/simple/x/",)
