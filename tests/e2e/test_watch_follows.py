"""--watch follows what a load read: the script and the modules it requires (subfolders, files
behind a ConfigMap's `..data` link), by content; the log names the file that changed; a
failed load is retried when what it tried to read is fixed or created."""

import os
import re
import shutil
import time
import urllib.request

import grpc
import pytest

import harness as h

SETTLE_S = 0.2          # WATCH_SETTLE_MS in src/supervisor.c
QUIET_S = SETTLE_S * 4  # long enough for a reload the watch should not do to show

MAIN = """
local util = require "lib.auth.util"
function on_request_headers(headers, ctx)
  return { add = { {"x-tag", util.tag()} } }
end
"""

MAIN_NO_UTIL = """
function on_request_headers(headers, ctx)
  return { add = { {"x-tag", "plain"} } }
end
"""


def module(tag):
    return 'local M = {}\nfunction M.tag() return "%s" end\nreturn M\n' % tag


def tag_of(stub):
    responses, code, details = h.process(stub, [h.headers_req("request_headers", [(":path", "/")])])
    assert code == grpc.StatusCode.OK, details
    muts = responses[0].request_headers.response.header_mutation.set_headers
    return [m.header.raw_value.decode() for m in muts if m.header.key == "x-tag"][0]


def metrics(server):
    with urllib.request.urlopen(f"http://{server.target('health')}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: int(v) for k, v in re.findall(r"^(luacallout_\w+) (\d+)$", text, re.M)}


def generation(server):
    return metrics(server)["luacallout_script_generation"]


def failures(server):
    return metrics(server)["luacallout_reload_failures_total"]


def wait_generation(server, n, timeout=5.0):
    h.wait_for(lambda: generation(server) == n, timeout, f"generation {n}\n{server.log()}")


def stays(server, gen, fails=None):
    """Nothing reloads (or fails to) for well past the settle time."""
    time.sleep(QUIET_S)
    assert generation(server) == gen, server.log()
    if fails is not None:
        assert failures(server) == fails, server.log()


def tree(tmp, files):
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def start(servers, script):
    srv = servers.start(script, "--watch", "--threads", "1")
    h.wait_for(lambda: "watching" in srv.log(), 5, "the watch")
    return srv


@pytest.fixture
def app(servers):
    d = servers.tmpdir / "app"
    tree(d, {"main.lua": MAIN, "lib/auth/util.lua": module("A")})
    return d


def test_a_module_in_a_subfolder_changes_and_the_log_names_it(servers, app):
    srv = start(servers, app / "main.lua")
    stub = srv.stub()
    assert tag_of(stub) == "A"
    (app / "lib/auth/util.lua").write_text(module("B"))
    wait_generation(srv, 2)
    assert re.search(r"watch: lib/auth/util\.lua changed: reloading", srv.log()), srv.log()
    assert tag_of(stub) == "B"
    # two files at once: both named
    (app / "lib/auth/util.lua").write_text(module("C"))
    (app / "main.lua").write_text(MAIN + "-- edited\n")
    wait_generation(srv, 3)
    assert re.search(r"watch: (main\.lua, lib/auth/util\.lua|lib/auth/util\.lua, main\.lua) "
                     r"changed: reloading", srv.log()), srv.log()
    assert tag_of(stub) == "C"


def configmap(vol, version, files):
    """A ConfigMap volume as the kubelet writes it: the files in `..<version>`, `..data` a
    link to it, each top-level name a link through `..data`."""
    tree(vol / f"..{version}", files)
    if not os.path.lexists(vol / "..data"):
        os.symlink(f"..{version}", vol / "..data")
        for top in {rel.split("/")[0] for rel in files}:
            os.symlink(f"..data/{top}", vol / top)
    else:
        os.symlink(f"..{version}", vol / "..data_tmp")
        os.rename(vol / "..data_tmp", vol / "..data")   # the atomic swap


def test_configmap_swap_of_a_module_behind_data(servers):
    vol = servers.tmpdir / "cm"
    vol.mkdir()
    configmap(vol, "v1", {"main.lua": MAIN, "lib/auth/util.lua": module("A")})
    srv = start(servers, vol / "main.lua")
    stub = srv.stub()
    assert tag_of(stub) == "A"
    configmap(vol, "v2", {"main.lua": MAIN, "lib/auth/util.lua": module("B")})
    shutil.rmtree(vol / "..v1")   # the kubelet removes the old folder
    wait_generation(srv, 2)
    assert tag_of(stub) == "B"
    line = re.search(r"watch: (.*) changed: reloading", srv.log()).group(1)
    assert line == "lib/auth/util.lua", srv.log()   # main.lua's bytes are the same
    # the same bytes in a new version: nothing a load reads differs
    configmap(vol, "v3", {"main.lua": MAIN, "lib/auth/util.lua": module("B")})
    stays(srv, 2)
    # and the folders of v3 are followed: the next swap is seen too
    configmap(vol, "v4", {"main.lua": MAIN, "lib/auth/util.lua": module("D")})
    wait_generation(srv, 3)
    assert tag_of(stub) == "D"


def test_touch_and_identical_bytes_do_not_reload(servers, app):
    srv = start(servers, app / "main.lua")
    for rel in ("main.lua", "lib/auth/util.lua"):
        os.utime(app / rel)
        stays(srv, 1)
        (app / rel).write_bytes((app / rel).read_bytes())
        stays(srv, 1)
        # replaced by a rename with the same bytes, as editors save
        (app / (rel + ".tmp")).write_bytes((app / rel).read_bytes())
        os.replace(app / (rel + ".tmp"), app / rel)
        stays(srv, 1)
    assert "changed: reloading" not in srv.log()
    # the watch still works after all that
    (app / "lib/auth/util.lua").write_text(module("B"))
    wait_generation(srv, 2)


def test_a_lua_file_no_load_reads_does_not_reload(servers, app):
    srv = start(servers, app / "main.lua")
    (app / "other.lua").write_text("return 1\n")
    (app / "lib/auth/other.lua").write_text("return 1\n")
    stays(srv, 1)
    (app / "other.lua").write_text("return 2\n")
    (app / "lib/auth/other.lua").write_text("return 2\n")
    stays(srv, 1)
    assert "changed: reloading" not in srv.log()


def test_a_broken_module_fails_the_reload_and_its_fix_reloads(servers, app):
    srv = start(servers, app / "main.lua")
    stub = srv.stub()
    (app / "lib/auth/util.lua").write_text("local M = {}\nfunction M.tag(\nreturn M\n")
    h.wait_for(lambda: failures(srv) == 1, 5, "the failed reload")
    assert re.search(r"reload of .* failed, still serving generation 1: .*"
                     r"lib/auth/util\.lua:3:", srv.log(), re.S), srv.log()
    assert generation(srv) == 1
    assert tag_of(stub) == "A"
    (app / "lib/auth/util.lua").write_text(module("B"))
    wait_generation(srv, 2)
    assert tag_of(stub) == "B"
    assert failures(srv) == 1


def test_a_missing_module_fails_the_load_and_creating_it_reloads(servers, app):
    srv = start(servers, app / "main.lua")
    stub = srv.stub()
    (app / "main.lua").write_text(MAIN.replace("lib.auth.util", "lib.new.thing"))
    h.wait_for(lambda: failures(srv) == 1, 5, "the failed reload")
    assert "module 'lib.new.thing' not found" in srv.log(), srv.log()
    assert tag_of(stub) == "A"
    # created in a folder that did not exist: the watch follows it
    (app / "lib/new").mkdir()
    time.sleep(QUIET_S)
    (app / "lib/new/thing.lua").write_text(module("N"))
    wait_generation(srv, 2)
    assert re.search(r"watch: lib/new/thing\.lua changed: reloading", srv.log()), srv.log()
    assert tag_of(stub) == "N"
    # the load succeeded: the unread files are no longer watched
    (app / "lib/auth/util.lua").write_text(module("X"))
    (app / "unrelated.lua").write_text("return 1\n")
    stays(srv, 2, fails=1)


def test_a_module_no_longer_required_stops_being_watched(servers, app):
    srv = start(servers, app / "main.lua")
    stub = srv.stub()
    (app / "main.lua").write_text(MAIN_NO_UTIL)
    wait_generation(srv, 2)
    assert tag_of(stub) == "plain"
    (app / "lib/auth/util.lua").write_text(module("B"))
    stays(srv, 2)
    # required again: watched again
    (app / "main.lua").write_text(MAIN)
    wait_generation(srv, 3)
    assert tag_of(stub) == "B"
    (app / "lib/auth/util.lua").write_text(module("C"))
    wait_generation(srv, 4)
    assert tag_of(stub) == "C"


@pytest.mark.parametrize("where", ["app", "."])
def test_a_relative_script_path_names_modules_relative_to_its_folder(servers, where):
    from pathlib import Path
    d = servers.tmpdir / where
    tree(d, {"rel.lua": MAIN, "lib/auth/util.lua": module("A")})
    srv = start(servers, Path(where) / "rel.lua")   # relative to the server's cwd, tmpdir
    stub = srv.stub()
    assert tag_of(stub) == "A"
    (d / "lib/auth/util.lua").write_text(module("B"))
    wait_generation(srv, 2)
    assert re.search(r"watch: lib/auth/util\.lua changed: reloading", srv.log()), srv.log()
    assert tag_of(stub) == "B"


def release(base, n, tag, deploy=True):
    """A release-folder deploy (capistrano and the like): the files in releases/<n>, then
    `current` swapped over it by a rename, never edited in place."""
    tree(base / f"releases/{n}", {"main.lua": MAIN, "lib/auth/util.lua": module(tag)})
    if deploy:
        os.symlink(f"releases/{n}", base / "current.tmp")
        os.rename(base / "current.tmp", base / "current")


def test_release_folder_swaps_are_followed_every_time(servers):
    """The script is current/main.lua, `current -> releases/N`: the folder holding the
    link is watched and the link resolved anew at each check, so every swap is seen, not
    only the first, and the release folders left behind stop counting."""
    base = servers.tmpdir / "deploy"
    release(base, 1, "A", deploy=False)
    os.symlink("releases/1", base / "current")
    srv = start(servers, base / "current/main.lua")
    stub = srv.stub()
    assert tag_of(stub) == "A"
    time.sleep(QUIET_S)   # the check of the first set has run: what follows are events
    release(base, 2, "B")
    wait_generation(srv, 2)
    assert tag_of(stub) == "B"
    release(base, 3, "B")   # the same bytes in a new release: nothing to reload
    stays(srv, 2)
    release(base, 4, "D")
    wait_generation(srv, 3)
    assert tag_of(stub) == "D"
    (base / "releases/4/lib/auth/util.lua").write_text(module("E"))   # a hotfix in place
    wait_generation(srv, 4)
    assert tag_of(stub) == "E"
    (base / "releases/2/lib/auth/util.lua").write_text(module("OLD"))  # no longer current
    (base / "releases/3/main.lua").write_text(MAIN_NO_UTIL)
    stays(srv, 4)
    assert tag_of(stub) == "E"


def keep_writing(path, every_s, until, text=None):
    """Appends a line (or writes `text`) to path every every_s seconds until `until`."""
    import threading

    def run():
        i = 0
        while time.monotonic() < until:
            if text is None:
                with open(path, "a") as f:
                    f.write(f"line {i}\n")
            else:
                path.write_text(text)
            i += 1
            time.sleep(every_s)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_steady_writes_do_not_hold_a_reload_back(servers, app):
    """A file written every 20 ms next to the script (a log, --record into its folder) is
    no event worth a check, so a module change is reloaded at once; and a watched file
    itself rewritten without pause is reloaded within about a second anyway."""
    srv = start(servers, app / "main.lua")
    stub = srv.stub()
    time.sleep(QUIET_S)
    writers = [keep_writing(app / "app.log", 0.02, time.monotonic() + 4),
               keep_writing(app / "lib/auth/app.log", 0.02, time.monotonic() + 4)]
    time.sleep(0.3)
    t0 = time.monotonic()
    (app / "lib/auth/util.lua").write_text(module("B"))
    wait_generation(srv, 2, timeout=1.5)   # the writers go on for 3.7 s more
    assert time.monotonic() - t0 < 1.5
    assert tag_of(stub) == "B"
    for w in writers:
        w.join()
    # the module itself rewritten (the same new bytes) every 50 ms for 4 s
    t0 = time.monotonic()
    w = keep_writing(app / "lib/auth/util.lua", 0.05, t0 + 4, text=module("C"))
    wait_generation(srv, 3, timeout=2.5)
    assert time.monotonic() - t0 < 2.5, "reloaded only once the writes stopped"
    assert tag_of(stub) == "C"
    w.join()
