"""The daemons of the build under test (cqrs-commandd, cqrs-queryd): start with failpoints armed,
readiness, supervision (restart when dead), stop, state and metrics."""

import os
import signal
import subprocess
import threading
import time

from common import SetupError, free_port, http_call, log


class Daemon:
    """One cqrs-commandd or cqrs-queryd. A supervised daemon that dies (a failpoint killed it,
    or the nemesis did) is started again; `arm` restarts keep their failpoints."""

    def __init__(self, run, kind, name, failpoints="", env=None, arm=0):
        self.run, self.kind, self.name = run, kind, name
        self.port = free_port()
        self.failpoints, self.extra_env, self.arm = failpoints, env or {}, arm
        self.proc = None
        self.exit_code = None  # of the last process, when stopped by SIGTERM
        self.deaths = 0
        self.supervised = True
        self.lock = threading.Lock()

    def env(self, armed):
        e = dict(os.environ)
        e.update(self.run.daemon_env())
        e["CQRS_HTTP_PORT"] = str(self.port)
        e.update(self.extra_env)
        e.pop("CQRS_FAILPOINTS", None)
        if armed and self.failpoints:
            e["CQRS_FAILPOINTS"] = self.failpoints
        return e

    def start(self, armed=True, wait=True):
        binary = os.path.join(self.run.build, "cmd", "cqrs-" + self.kind)
        logf = open(os.path.join(self.run.logdir, self.name + ".log"), "a")
        self.proc = subprocess.Popen([binary], env=self.env(armed), stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, seconds=60):
        end = time.time() + seconds
        while time.time() < end:
            if self.proc.poll() is not None and not self.supervised:
                raise SetupError("%s exited (%s) during start-up" % (self.name, self.proc.returncode))
            st, _, _ = http_call(self.port, "GET", "/readyz", timeout=2)
            if st == 200:
                return True
            time.sleep(0.1)
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def supervise_once(self):
        """Restart when dead; returns True when it restarted."""
        with self.lock:
            if not self.supervised or self.alive():
                return False
            self.deaths += 1
            armed = self.deaths < self.arm
            log("%s: %s died (%s); restarting%s"
                % (self.run.name, self.name, self.proc.returncode, " armed" if armed else ""))
            self.start(armed=armed, wait=False)
            return True

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self):
        with self.lock:
            self.supervised = False
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.exit_code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "a hang (SIGKILLed after 30 s)"

    def state(self):
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "?"

    def metric(self, name):
        st, _, body = http_call(self.port, "GET", "/metrics", timeout=3)
        if st != 200:
            return None
        for line in body.decode(errors="replace").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        return None
