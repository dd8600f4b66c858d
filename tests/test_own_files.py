"""own_files: what counts as a file already written (bytes, mode, owner; never a link)."""

from backchat import own_files

TEXT = "services: {}\n"


def entry(**fields):
    return {"kind": "file", "mode": "644", "user": "root", "group": "root", "sha256": own_files.digest(TEXT), **fields}


def test_a_file_with_these_bytes_mode_and_owner_is_current():
    assert own_files.is_current(entry(), own_files.digest(TEXT), "0644")
    assert own_files.is_current(entry(), own_files.digest(TEXT), "0644", user="root", group="root")
    assert own_files.is_current(entry(), own_files.digest(TEXT))  # no mode asked: any mode


def test_other_bytes_mode_owner_a_link_or_nothing_is_not():
    digest = own_files.digest(TEXT)
    assert not own_files.is_current(entry(sha256=own_files.digest("other")), digest, "0644")
    assert not own_files.is_current(entry(mode="664"), digest, "0644")
    assert not own_files.is_current(entry(mode="600"), digest, "0644")
    assert not own_files.is_current(entry(user="backstage"), digest, "0644", user="root")
    assert not own_files.is_current(entry(group="staff"), digest, "0644", group="root")
    # A link at the name, even to a file with these bytes, is replaced: never written through.
    assert not own_files.is_current(entry(kind="link", mode=None, sha256=None), digest, "0644")
    assert not own_files.is_current(entry(kind="directory"), digest, "0644")
    assert not own_files.is_current(None, digest, "0644")
