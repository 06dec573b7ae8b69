"""Screenshots for issue 16: the emoji picker, file-transfer progress bars and
the sidebar, in a real window on Xvfb.  Run from the repository root:
    python docs/issue16/shots.py before|after
"""
import argparse
import subprocess
import sys
import tempfile
import time
import tkinter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pychat  # noqa: E402
import test_pychat as t  # noqa: E402


def main(prefix: str) -> None:
    out = Path(__file__).resolve().parent
    t.setUpModule()
    srv = t.ServerThread(motd="Team chat · be kind").start()
    root = tkinter.Tk()
    root.geometry("900x600+0+0")
    tmp = tempfile.TemporaryDirectory()
    app = pychat.GuiApp(root, argparse.Namespace(host=t.HOST, port=srv.port, nick="alice"),
                        settings_path=Path(tmp.name) / "s.json")

    def pump(cond=lambda: True, timeout=5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            root.update()
            time.sleep(0.01)

    def grab(name: str) -> None:
        root.update()
        time.sleep(0.3)  # let Xft finish drawing
        root.update()
        dump = subprocess.run(["xwd", "-silent", "-id", str(root.winfo_id())],
                              capture_output=True, check=True).stdout
        t.xwd_to_png(dump, out / f"{prefix}-{name}.png")
        print("wrote", out / f"{prefix}-{name}.png")

    pump(lambda: app.window is not None)
    w = app.window
    peers = {n: t.SyncPeer(srv.port, n) for n in ("bob", "carol", "dave")}
    peers["bob"].send({"type": "msg", "text": "Morning! Build 1432 is green 🎉"})
    peers["bob"].send({"type": "msg", "text": "release notes are up ☕"})
    peers["carol"].send({"type": "msg", "text": "nice work 👍\nsecond line of carol's message"})
    pump(lambda: "second line" in w.chat.get("1.0", "end"))
    for room in ("#dev", "#release"):
        w.run_command(f"/join {room}")
        pump(lambda: room in w.convos and w.convos[room].users)
    w.run_command("/room #lobby")
    peers["bob"].send({"type": "pm", "to": "alice", "text": "lunch at 1?"})
    pump(lambda: "@bob" in w.convos)
    pump(lambda: len(w.user_names()) == 4)
    grab("sidebar")
    # Progress bars: one half way, one done.
    for tid, done in (("t1", 45), ("t2", 100)):
        w.handle_event({"type": "file_offer", "id": tid, "from": "bob", "name": f"build-{tid}.zip",
                        "size": 4_000_000})
        w.files[tid]["convo"] = w.convo
        w.handle_event({"type": "file_progress", "id": tid, "direction": "in", "nick": "bob",
                        "done": 40_000 * done, "size": 4_000_000, "speed": 800_000, "eta": 3})
    w.handle_event({"type": "file_received", "id": "t2", "path": "/tmp/build-t2.zip"})
    pump()
    grab("progress")
    w.emoji_button.widget.invoke()
    pump(lambda: w.emoji_panel is not None)
    dump = subprocess.run(["xwd", "-silent", "-root"], capture_output=True, check=True).stdout
    root.update()
    time.sleep(0.3)
    root.update()
    dump = subprocess.run(["xwd", "-silent", "-root"], capture_output=True, check=True).stdout
    t.xwd_to_png(dump, out / f"{prefix}-picker.png")
    print("wrote", out / f"{prefix}-picker.png")
    w.close_emoji()
    if prefix == "after":  # new in issue 16: /help in columns, the disconnect banner
        w.show_convo("#dev")
        w.run_command("/help")
        grab("help")
        for p in peers.values():
            p.close()
        srv.stop()
        pump(lambda: w.banner.winfo_ismapped())
        grab("banner")
    for p in peers.values():
        p.close()
    w.close()
    srv.stop()
    t.tearDownModule()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "after")
