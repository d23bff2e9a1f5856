"""The code_tests harness: the programs `run_python` runs in the sandbox for one completion (stdlib only).

`_harness_program()` is the trusted harness (`_harness_main`: our code and the dataset's tests), carrying as a
string the program of the candidate's own interpreter (`_child_main`), which never sees the tests. Their functions
are sent as source and never called in the trainer's process; `llmrl.rewards.code` explains the trust boundary.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

def _encode(x, depth=0):
    """A value as plain JSON data, tagged where JSON has no type of its own (candidate side: may be lenient)."""
    if depth > 200:
        raise TypeError("a value nested more than 200 deep")
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str(x)
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if isinstance(x, list):
        return [_encode(v, depth + 1) for v in x]
    if isinstance(x, tuple):
        return {"t": [_encode(v, depth + 1) for v in x]}
    if isinstance(x, dict):
        return {"d": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in x.items()]}
    if isinstance(x, frozenset):
        return {"fs": [_encode(v, depth + 1) for v in x]}
    if isinstance(x, set):
        return {"s": [_encode(v, depth + 1) for v in x]}
    raise TypeError(f"a {type(x).__name__} cannot be passed between the candidate and the tests")


def _decode(x, depth=0):
    """Inverse of _encode, strict (harness side: the data may be hostile); raises ValueError on anything else."""
    if depth > 200:
        raise ValueError("a value nested more than 200 deep")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_decode(v, depth + 1) for v in x]
    if type(x) is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
            return complex(v[0], v[1])
        if type(v) is list:
            items = [_decode(p, depth + 1) for p in v]
            if tag == "t":
                return tuple(items)
            if tag == "s":
                return set(items)
            if tag == "fs":
                return frozenset(items)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in v):
                return {_decode(k, depth + 1): _decode(val, depth + 1) for k, val in v}
    raise ValueError("malformed value from the candidate process")


def _send(fd, obj):
    """One message to fd (blocking): 8-byte length, then JSON."""
    data = _dumps(obj).encode()
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data):]


def _send_until(fd, obj, deadline):
    """One message to a non-blocking fd; raises TimeoutError past the deadline (time.monotonic())."""
    data = _dumps(obj).encode()
    data = len(data).to_bytes(8, "little") + data
    while data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError
        data = data[os.write(fd, data):]


def _recv(fd, deadline=None, limit=64 << 20):
    """One message from fd; raises TimeoutError past the deadline (time.monotonic()), EOFError if the writer died."""
    def read(n):
        buf = b""
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    n = int.from_bytes(read(8), "little")
    if n > limit:
        raise ValueError(f"a message of {n} bytes from the candidate's process")
    return _loads(read(n))


def _guard(event, args, getsid=os.getsid):
    """The runner's audit hook again (hooks do not survive exec): no sockets, no signals outside the session."""
    if event.startswith("socket."):
        raise PermissionError(f"network access is disabled in the sandbox (llmrl audit hook: {event})")
    if event in ("os.kill", "os.killpg") and args[0] != 0:
        target = -args[0] if event == "os.kill" and args[0] < -1 else args[0]
        try:
            outside = target == -1 or getsid(target) != getsid(0)
        except OSError:
            outside = False
        if outside:
            raise PermissionError("signals to processes outside the sandbox are blocked (llmrl audit hook)")


def _describe(e):
    try:
        return f"{type(e).__name__}: {e}"[:300]
    except BaseException:  # a hostile __str__
        return type(e).__name__


def _child_main(req_fd, resp_fd):
    """The candidate's process: run its code, report the names it defines, then answer calls until EOF."""
    sys.addaudithook(_guard)
    ns = {"__name__": "candidate", "__builtins__": __builtins__}
    try:
        exec(compile(_recv(req_fd)["source"], "candidate.py", "exec"), ns)
    except BaseException as e:
        _send(resp_fd, {"error": _describe(e)})
        return
    names = {}  # name -> None for a function, {"value": ...} for data
    for k, v in list(ns.items()):
        if k.startswith("__") or type(v).__name__ == "module":
            continue
        if callable(v):
            names[k] = None
        else:
            try:
                names[k] = {"value": _encode(v)}
            except (TypeError, RecursionError):
                pass
    _send(resp_fd, {"names": names})
    while True:
        try:
            req = _recv(req_fd)
        except EOFError:
            return
        try:
            out = ns[req["name"]](*[_decode(a) for a in req["args"]],
                                  **{k: _decode(v) for k, v in req["kwargs"].items()})
            try:
                reply = {"value": _encode(out)}
            except (TypeError, RecursionError) as e:
                reply = {"unsupported": _describe(e)}
        except BaseException as e:
            reply = {"raise": [type(e).__name__, _describe(e)]}
        _send(resp_fd, reply)


class _HarnessError(Exception):
    """A test failed because of the candidate's process (died, timed out, gave something untransferable)."""


class _Candidate:
    """The candidate's process, seen from the harness: started on demand, restarted after a death or a hang.
    `deadline` (time.monotonic()) bounds every exchange; `call_s` sums the wall time of the calls."""

    def __init__(self, source, child_program):
        self.source, self.child_program = source, child_program
        self.pid, self.names, self.call_s, self.deadline = None, {}, 0.0, None

    def start(self):
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        os.set_inheritable(req_r, True)
        os.set_inheritable(resp_w, True)
        devnull = os.open(os.devnull, os.O_RDWR)
        flags = ["-s", "-S", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
        argv = [sys.executable, *flags, "-c", self.child_program, str(req_r), str(resp_w)]
        try:  # a fresh interpreter: nothing of ours (the tests) is in its memory; stdout is not ours either
            self.pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2)])
        finally:
            for fd in (req_r, resp_w, devnull):
                os.close(fd)
        os.set_blocking(self.req_w, False)
        reply = self._exchange({"source": self.source})
        if type(reply) is dict and type(reply.get("names")) is dict:
            self.names = reply["names"]
            return
        self.stop()
        why = reply.get("error") if type(reply) is dict else None
        raise _HarnessError(f"the candidate's code raised {str(why)[:300]}" if why else "malformed reply")

    def _exchange(self, msg):
        try:
            _send_until(self.req_w, msg, self.deadline)
            return _recv(self.resp_r, self.deadline)
        except TimeoutError:
            self.stop()
            raise _HarnessError("timed out") from None
        except (EOFError, OSError, ValueError, RecursionError) as e:
            why = self.stop()
            raise _HarnessError(f"the candidate's process died ({why or _describe(e)})") from None

    def call(self, name, args, kwargs):
        if self.pid is None:
            self.start()
        if name not in self.names or self.names[name] is not None:
            raise _HarnessError(f"the candidate's code defines no function {name}")
        try:
            msg = {"name": name, "args": [_encode(a) for a in args],
                   "kwargs": {k: _encode(v) for k, v in kwargs.items()}}
        except (TypeError, RecursionError) as e:
            raise _HarnessError(f"the test passes something the harness cannot send: {e}") from None
        t = time.monotonic()
        reply = self._exchange(msg)
        self.call_s += time.monotonic() - t
        if type(reply) is dict and "value" in reply:
            try:
                return _decode(reply["value"])
            except (ValueError, TypeError, RecursionError) as e:
                self.stop()
                raise _HarnessError(_describe(e)) from None
        if type(reply) is dict and type(reply.get("raise")) is list and len(reply["raise"]) == 2:
            kind, text = (str(p)[:300] for p in reply["raise"])
            exc = getattr(builtins, kind, None)  # a test may expect the candidate to raise, say, ValueError
            if isinstance(exc, type) and issubclass(exc, Exception) and exc.__module__ == "builtins":
                try:
                    error = exc(f"{text} (raised by the candidate)")
                except Exception:  # one that takes other arguments (UnicodeDecodeError)
                    error = _HarnessError(f"the candidate raised {text}")
                raise error
            raise _HarnessError(f"the candidate raised {text}")
        if type(reply) is dict and "unsupported" in reply:
            raise _HarnessError(f"the candidate returned what the tests cannot receive: {str(reply['unsupported'])}")
        self.stop()
        raise _HarnessError("malformed reply from the candidate's process")

    def stop(self):
        """Kill the process if it runs; how it ended ("" if it was not running)."""
        if self.pid is None:
            return ""
        for fd in (self.req_w, self.resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, 9)
        except OSError:  # it left our session (setsid): the sandbox's end gets it
            return "it escaped the harness's session"
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return f"exit code {code}" if code >= 0 else f"signal {-code}"


def _lint(source):
    """Lint issues of the candidate's code, without running it: long lines, unused imports and locals, bare except."""
    import ast
    issues = [f"line {i} is {len(line)} characters" for i, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return issues + [f"does not parse: {_describe(e)}"]
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "") != "__future__":
            for alias in node.names:
                name = (alias.asname or alias.name).split(".")[0]
                if name != "*" and name not in loaded:
                    issues.append(f"line {node.lineno}: unused import {name}")
        elif isinstance(node, ast.ExceptHandler) and node.type is None:
            issues.append(f"line {node.lineno}: bare except")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            shared = {x for n in ast.walk(node) if isinstance(n, (ast.Global, ast.Nonlocal)) for x in n.names}
            stored = {n.id: n.lineno for n in ast.walk(node)
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for name, lineno in stored.items():
                if name not in used and name not in shared and name != "_":
                    issues.append(f"line {lineno}: local {name} is assigned but never used")
    return issues


def _harness_main(child_program):
    """The trusted side: compile the candidate, run the tests one by one against it, print one JSON line each."""
    start = time.monotonic()
    # Not dumpable: the candidate (same uid) must not read our memory through /proc/<pid>/mem. Dropping the uid
    # (the sandbox as root) already made us so: /proc/self then belongs to root. Else ask (ctypes costs ~5 ms).
    if os.stat("/proc/self/status").st_uid == os.getuid():
        try:
            import ctypes
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        except Exception:
            pass
    spec = _loads(sys.stdin.read())
    overall = start + spec["deadline_s"]
    steps = spec["steps"]

    def emit(**event):
        sys.stdout.write(_dumps(event) + "\n")
        sys.stdout.flush()

    def fail_all(why):
        for i in range(len(steps)):
            emit(event="test", i=i, passed=False, reason=why)
        emit(event="done", call_s=0.0, error=why)

    if spec["style_source"] is not None:
        emit(event="style", issues=_lint(spec["style_source"]))
    source, error = None, None
    for s in spec["sources"]:
        try:
            compile(s, "candidate.py", "exec")
            source = s
            break
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            error = error or _describe(e)
    if source is None:
        return fail_all(f"the code does not compile: {error}")
    ns = {"__name__": "__harness__"}
    try:
        exec(compile(spec["setup"], "setup.py", "exec"), ns)
    except Exception as e:
        return fail_all(f"the test setup failed: {_describe(e)}")
    cand = _Candidate(source, child_program)
    cand.deadline = min(overall, time.monotonic() + spec["test_timeout_s"])
    try:
        cand.start()
    except _HarnessError as e:
        return fail_all(str(e))

    def proxy(name):
        def call(*args, **kwargs):
            return cand.call(name, args, kwargs)
        call.__name__ = name
        return call

    for name in spec["proxies"]:  # the names the tests read; what the candidate defines stands behind them
        if name not in cand.names:
            continue
        try:
            value = cand.names[name]
            ns[name] = proxy(name) if value is None else _decode(value["value"])
        except (ValueError, TypeError, KeyError, RecursionError):
            pass
    if "candidate" in spec["aliases"]:  # HumanEval: the entry point, even when the candidate lacks it
        ns[spec["aliases"]["candidate"]] = proxy(spec["aliases"]["candidate"])
    ns.update({alias: ns[target] for alias, target in spec["aliases"].items()})
    for i, step in enumerate(steps):
        now = time.monotonic()
        if now >= overall:
            emit(event="test", i=i, passed=False, reason="not run: the time budget is spent")
            continue
        cand.deadline = min(overall, now + spec["test_timeout_s"])
        try:
            exec(compile(step["src"], f"test_{i}.py", "exec"), ns)
            emit(event="test", i=i, passed=True, reason="")
        except AssertionError as e:
            emit(event="test", i=i, passed=False, reason=f"failed: {step['src'][:200]}" + (f" ({e})" if str(e) else ""))
        except _HarnessError as e:
            emit(event="test", i=i, passed=False, reason=f"{e}, in: {step['src'][:200]}")
        except Exception as e:
            emit(event="test", i=i, passed=False, reason=f"{_describe(e)}, in: {step['src'][:200]}")
    cand.stop()
    emit(event="done", call_s=cand.call_s, error=None)


_HEADER = """import builtins, os, select, sys, time
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)
try:  # json's own C scanner and encoder, without `import json`: its `re` costs ~8 ms of CPU in each process
    import _json
    class _JSONContext:
        strict, object_hook, object_pairs_hook = True, None, None
        parse_float, parse_int, parse_constant = float, int, float
    def _no_default(o):
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    _scan = _json.make_scanner(_JSONContext())
    _encoder = _json.make_encoder(None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False,
                                  True)
    def _dumps(obj):
        return "".join(_encoder(obj, 0))
    def _loads(s):
        s = s.decode() if isinstance(s, (bytes, bytearray)) else s
        start = len(s) - len(s.lstrip(" \\t\\n\\r"))
        try:
            obj, end = _scan(s, start)
        except StopIteration:
            raise ValueError("no JSON value") from None
        if s[end:].strip(" \\t\\n\\r"):
            raise ValueError("extra data after the JSON value")
        return obj
    assert _loads(_dumps([1, 2.5, "x", None, {"a": [True]}])) == [1, 2.5, "x", None, {"a": [True]}]
except Exception:  # another Python's internals: the module itself
    import json
    _dumps, _loads = json.dumps, json.loads
"""


_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _harness_program() -> str:
    """The program run_python runs for code_tests: the harness, carrying the candidate's program as a string.

    Built under a lock: `inspect.getsource` parses with `ast`, and two threads parsing at once can fail in CPython 3.11
    with "SystemError: AST constructor recursion depth mismatch"."""
    with _BUILD_LOCK:
        return _build_harness_program()


def _build_harness_program() -> str:
    src = lambda *objs: "\n\n".join(inspect.getsource(o) for o in objs)  # noqa: E731
    child = _HEADER + src(_encode, _decode, _send, _recv, _guard, _describe, _child_main) + \
        "\n\n_child_main(int(sys.argv[1]), int(sys.argv[2]))\n"
    return (_HEADER + src(_encode, _decode, _send, _send_until, _recv, _describe, _HarnessError, _Candidate, _lint,
                          _harness_main) + f"\n\n_harness_main({child!r})\n")
