"""``exim-policy files`` on the source checkout, and the one place that says where the admin
files are (exim_policy/admin_files.py), which the lab reads them through. The same from an
installed wheel is tests/test_wheel_install.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exim_policy import admin_files
from exim_policy.cli import main
from exim_policy.lab.contrib import contrib_path
from exim_policy.lab.errors import LabUnavailable
from exim_policy.lab.exim import CONFIG_FILES, find_exim_dir

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def shipped() -> tuple[str, ...]:
    return admin_files.shipped_files(REPO)


# ----------------------------------------------------------------- what ships --
def test_shipped_files_are_the_admin_files_and_not_the_lab_scripts():
    files = shipped()
    for name in CONFIG_FILES:
        assert f"exim/{name}" in files
    assert "exim/README.md" in files
    assert "exim/debian/conf.d/main/04_exim-policy_options" in files
    assert {"contrib/config.example.toml", "contrib/systemd/exim-policy.service",
            "contrib/systemd/exim-policy.sysusers", "contrib/systemd/exim-policy.tmpfiles",
            "contrib/haraka/rspamd.ini", "contrib/postfix/main.cf",
            "contrib/rspamd/local.d/multimap.conf"} <= set(files)
    assert not [f for f in files if f.startswith("contrib/") and f.endswith(".sh")]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert list(files) == sorted(files)


def test_a_missing_shipped_entry_is_an_error(tmp_path):
    (tmp_path / "exim").mkdir()
    with pytest.raises(admin_files.AdminFilesError, match="contrib/config.example.toml"):
        admin_files.shipped_files(tmp_path)


def test_the_checkout_is_used_when_no_package_data_is_installed():
    found = admin_files.locate()
    assert found.root == REPO and not found.installed and found.files == shipped()
    assert find_exim_dir() == REPO / "exim"
    assert contrib_path("haraka/rspamd.ini") == REPO / "contrib" / "haraka" / "rspamd.ini"


# -------------------------------------------------------------------- listing --
def test_lists_every_file_and_where_they_are(capsys):
    rc, out, err = cli(capsys, "files")
    header, *paths = out.splitlines()
    assert rc == 0 and err == ""
    assert header == f"# {REPO} (source checkout): {len(shipped())} files"
    assert tuple(paths) == shipped()


def test_lists_a_directory_or_one_file(capsys):
    rc, out, _ = cli(capsys, "files", "./contrib/systemd/")
    assert rc == 0 and out.splitlines()[1:] == [
        "contrib/systemd/exim-policy.service", "contrib/systemd/exim-policy.sysusers",
        "contrib/systemd/exim-policy.tmpfiles"]
    rc, out, _ = cli(capsys, "files", "exim/main.conf")
    assert rc == 0 and out.splitlines()[1:] == ["exim/main.conf"]
    assert out.splitlines()[0].endswith(": 1 file")


@pytest.mark.parametrize("path, message", [
    ("contrib/setup.sh", "'contrib/setup.sh' is none of the shipped files"),
    ("exim/main", "'exim/main' is none of the shipped files"),
    ("/etc/passwd", "expected a path relative to the shipped files"),
    ("exim/../contrib/setup.sh", "expected a path relative to the shipped files"),
])
def test_unknown_paths_are_refused(capsys, tmp_path, path, message):
    for argv in (("files", path), ("files", "--show", path),
                 ("files", "--copy", str(tmp_path / "out"), path)):
        rc, out, err = cli(capsys, *argv)
        assert rc == 2 and out == "" and message in err, argv
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- show --
def test_show_prints_the_file_byte_for_byte(capsysbinary):
    assert main(["files", "--show", "contrib/config.example.toml"]) == 0
    out = capsysbinary.readouterr().out
    assert out == (REPO / "contrib" / "config.example.toml").read_bytes()


def test_show_refuses_a_directory_and_an_extra_path(capsys):
    rc, _, err = cli(capsys, "files", "--show", "exim/debian")
    assert rc == 2 and "'exim/debian' is a directory" in err
    assert "exim-policy files exim/debian lists it" in err
    rc, _, err = cli(capsys, "files", "--show", "exim/main.conf", "exim")
    assert rc == 2 and "--show takes one FILE" in err


def test_force_needs_copy_and_copy_excludes_show(capsys, tmp_path):
    rc, _, err = cli(capsys, "files", "--force")
    assert rc == 2 and "--force goes with --copy" in err
    with pytest.raises(SystemExit) as exc:
        main(["files", "--copy", str(tmp_path), "--show", "exim/main.conf"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------- copy --
def test_copy_creates_the_directory_and_copies_everything(capsys, tmp_path):
    target = tmp_path / "etc" / "exim-policy"
    rc, out, err = cli(capsys, "files", "--copy", str(target))
    files = shipped()
    assert rc == 0 and err == ""
    assert out == f"{target}: {len(files)} copied, 0 unchanged, 0 overwritten, 0 kept\n"
    for relative in files:
        assert (target / relative).read_bytes() == (REPO / relative).read_bytes(), relative
    copied = [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()]
    assert sorted(copied) == list(files)

    rc, out, _ = cli(capsys, "files", "--copy", str(target))  # again: nothing to do
    assert rc == 0 and out == f"{target}: 0 copied, {len(files)} unchanged, 0 overwritten, 0 kept\n"


def test_copy_keeps_a_changed_file_unless_forced(capsys, tmp_path):
    target = tmp_path / "out"
    assert cli(capsys, "files", "--copy", str(target))[0] == 0
    edited = target / "exim" / "main.conf"
    edited.write_text("# the admin's own main.conf\n")
    edited.chmod(0o600)
    (target / "exim" / "routers.conf").unlink()

    rc, out, err = cli(capsys, "files", "--copy", str(target))
    assert rc == 1
    assert err == (f"exim-policy files: {edited} differs from the shipped file; kept "
                   "(--force overwrites it)\n")
    assert out == f"{target}: 1 copied, {len(shipped()) - 2} unchanged, 0 overwritten, 1 kept\n"
    assert edited.read_text() == "# the admin's own main.conf\n"
    assert (target / "exim" / "routers.conf").read_bytes() == (REPO / "exim" / "routers.conf"
                                                               ).read_bytes()

    rc, out, err = cli(capsys, "files", "--copy", str(target), "--force")
    assert rc == 0 and err == "" and ", 1 overwritten, 0 kept" in out
    assert edited.read_bytes() == (REPO / "exim" / "main.conf").read_bytes()
    assert edited.stat().st_mode & 0o777 == 0o600  # the admin's mode stays


def test_copy_of_a_directory_or_a_file_is_relative_to_it(capsys, tmp_path):
    rc, out, _ = cli(capsys, "files", "--copy", str(tmp_path / "exim4"), "exim")
    assert rc == 0
    assert (tmp_path / "exim4" / "main.conf").read_bytes() == (REPO / "exim" / "main.conf"
                                                               ).read_bytes()
    assert (tmp_path / "exim4" / "debian" / "conf.d" / "main" / "04_exim-policy_options").is_file()
    assert not (tmp_path / "exim4" / "exim").exists()
    rc, _, _ = cli(capsys, "files", "--copy", str(tmp_path / "etc"), "contrib/config.example.toml")
    assert rc == 0 and [p.name for p in (tmp_path / "etc").iterdir()] == ["config.example.toml"]


def test_copy_reports_what_is_in_the_way(capsys, tmp_path):
    (tmp_path / "out" / "exim-policy.service").mkdir(parents=True)
    rc, _, err = cli(capsys, "files", "--copy", str(tmp_path / "out"), "contrib/systemd")
    assert rc == 2
    assert err.startswith(f"exim-policy files: cannot copy into {tmp_path / 'out'}: ")
    assert "exim-policy.service" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, "files", "--copy", str(tmp_path / "file"))
    assert rc == 2 and "cannot copy into" in err


# ----------------------------------------------- installed package data first --
@pytest.fixture
def package_data(tmp_path, monkeypatch) -> Path:
    """A stand-in for an installed exim_policy/share: the shipped files, copied."""
    share = tmp_path / "site-packages" / "exim_policy" / "share"
    for relative in shipped():
        (share / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, share / relative)
    monkeypatch.setattr(admin_files, "_package_data", lambda: share)
    return share


def test_installed_package_data_wins_over_the_checkout(package_data, capsys):
    found = admin_files.locate()
    assert found.root == package_data and found.installed and found.files == shipped()
    assert find_exim_dir() == package_data / "exim"
    assert contrib_path("postfix/main.cf") == package_data / "contrib" / "postfix" / "main.cf"
    rc, out, _ = cli(capsys, "files")
    assert rc == 0
    assert out.splitlines()[0] == (f"# {package_data} (installed package data): "
                                   f"{len(shipped())} files")


def test_the_lab_says_what_is_missing(package_data):
    (package_data / "exim" / "acl_data.conf").unlink()
    with pytest.raises(LabUnavailable, match=r"exim/ configuration at .* lacks acl_data\.conf"):
        find_exim_dir()
    with pytest.raises(LabUnavailable, match="'contrib/haraka/nope.ini' is none of the shipped"):
        contrib_path("haraka/nope.ini")


def test_neither_installed_nor_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(admin_files, "_package_data", lambda: None)
    fake = tmp_path / "site-packages" / "exim_policy" / "admin_files.py"
    monkeypatch.setattr(admin_files, "__file__", str(fake))
    with pytest.raises(admin_files.AdminFilesError,
                       match="neither installed with the package nor in a source checkout"):
        admin_files.locate()
    with pytest.raises(LabUnavailable, match="neither installed"):
        find_exim_dir()
