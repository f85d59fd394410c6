"""Drives Debian's headless chromium through the DevTools protocol over a pipe
(--remote-debugging-pipe: NUL-terminated JSON on fds 3 and 4; standard library only).

    status_browser.py CHROMIUM URL [--token T] [--click-retry ID] [--screenshot FILE]

Opens URL, waits until the status page has rendered (body[data-loaded="1"]), and prints a
JSON object: the text of the page's fields, the dead-letter rows, and, with --click-retry,
the page's answer after a real mouse click (DevTools Input events at the button's centre) on
that row's Retry button. Exits non-zero with a message on stderr when anything is missing or
times out.
"""

import argparse
import base64
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time

FIELDS = [
    "accepting",
    "upstream-state-us", "last-success-us", "last-failure-us", "consecutive-failures-us",
    "last-error-us",
    "upstream-state-eu", "last-success-eu", "last-failure-eu", "consecutive-failures-eu",
    "last-error-eu",
    "pending-events", "pending-payloads", "pending-bytes", "leased", "oldest-age",
    "ingest-rate", "delivery-rate", "dead-letter-count", "action-result",
]


class Browser:
    def __init__(self, chromium, profile):
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        # The child sees the DevTools pipe as fds 3 (its input) and 4 (its output).
        # Moved above 10 first, so that neither dup2 overwrites the other's source; the
        # close_fds pass that follows preexec_fn keeps only 3 and 4.
        def setup():
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
             "--window-size=1200,900", "--user-data-dir=" + profile, "about:blank"],
            preexec_fn=setup, pass_fds=(3, 4),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        self.next_id = 0

    def send(self, method, params=None, session=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no DevTools answer to {method} within {timeout} s")
                chunk = os.read(self.from_child, 1 << 16)
                if not chunk:
                    raise SystemExit(f"chromium closed the DevTools pipe during {method}")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise SystemExit(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (SystemExit, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def evaluate(b, session, expr):
    r = b.send("Runtime.evaluate", {"expression": expr, "returnByValue": True,
                                    "awaitPromise": True}, session)
    if "exceptionDetails" in r:
        raise SystemExit(f"page script failed: {r['exceptionDetails']}")
    return r["result"].get("value")


def wait_for(b, session, expr, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if evaluate(b, session, expr):
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


READ = """(() => {
  const out = {};
  for (const id of %s) { const e = document.getElementById(id); out[id] = e ? e.textContent : null; }
  out["pending-bytes-value"] = document.getElementById("pending-bytes").dataset.value;
  out.rows = [...document.querySelectorAll("#dead-letters tr[data-id]")].map((tr) =>
    [...tr.children].slice(0, 6).map((td) => td.textContent));
  out.chart_lines = document.querySelectorAll("#chart polyline").length;
  out.external = [...document.querySelectorAll("script[src], link[href], img[src]")].length;
  out.renders = Number(document.body.dataset.renders || 0);
  return out;
})()""" % json.dumps(FIELDS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("chromium")
    ap.add_argument("url")
    ap.add_argument("--token")
    ap.add_argument("--click-retry")
    ap.add_argument("--screenshot")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tributary-chromium-") as profile:
        b = Browser(args.chromium, profile)
        try:
            target = b.send("Target.createTarget", {"url": args.url})["targetId"]
            session = b.send("Target.attachToTarget",
                             {"targetId": target, "flatten": True})["sessionId"]
            wait_for(b, session, 'document.body && document.body.dataset.loaded === "1"',
                     "the page to render")
            result = {"before": evaluate(b, session, READ)}
            if args.screenshot:
                shot = b.send("Page.captureScreenshot", {"format": "png"}, session)
                with open(args.screenshot, "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
            if args.click_retry:
                if args.token:
                    evaluate(b, session, "document.getElementById('token').value = %s"
                             % json.dumps(args.token))
                sel = 'button[data-action="retry"][data-id=%s]' % json.dumps(args.click_retry)
                box = evaluate(b, session, """(() => {
                  const el = document.querySelector(%s);
                  if (!el) return null;
                  el.scrollIntoView({block: "center"});
                  const r = el.getBoundingClientRect();
                  return {x: r.left + r.width / 2, y: r.top + r.height / 2};
                })()""" % json.dumps(sel))
                if box is None:
                    raise SystemExit(f"no Retry button for dead letter {args.click_retry}")
                for kind in ("mousePressed", "mouseReleased"):
                    b.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"],
                           "y": box["y"], "button": "left", "clickCount": 1}, session)
                wait_for(b, session, "document.body.dataset.actions === '1'",
                         "the page to answer the click and refresh")
                result["after"] = evaluate(b, session, READ)
            print(json.dumps(result))
        finally:
            b.close()


if __name__ == "__main__":
    main()
