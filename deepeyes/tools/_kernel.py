"""The notebook a sandbox session runs: one namespace, Jupyter's display rules, bounded output.

Runs inside a session forked by the fork-server (`_forkserver.py`), which imports this module
before forking. It speaks length-prefixed JSON with the sandbox daemon over the session socket:

    daemon → kernel, per cell: {"code": "...", "cell": n}
    kernel → daemon, per cell: {"cell": n, "stdout": "...", "stderr": "...", "images": [file name, ...]}

Returned images are PNG files written into the session's scratch directory; the daemon takes
them out of the sandbox's reach and checks them before anyone reads them. Nothing here is
trusted: a cell can rewrite this module's objects, so the daemon bounds the frames it reads,
the output it passes on and the images it accepts itself (`sandbox_daemon`).
"""

import ast
import io
import json
import linecache
import os
import resource
import struct
import sys
import traceback
import types

MAX_OUTPUT_CHARS = 10_000  # per stream and cell; the model's context is the scarce resource
MAX_IMAGES = 10  # returned per cell, as DeepEyesV2 does
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


class BoundedText(io.TextIOBase):
    """sys.stdout/sys.stderr during a cell: keeps the head and the tail, says what it cut.

    The tail is kept because that is where a traceback is; the bound keeps a cell that prints
    in a loop from growing the kernel until it dies.
    """

    encoding = "utf-8"

    def __init__(self, limit: int = MAX_OUTPUT_CHARS):
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = ""
        self._tail = ""
        self._total = 0

    def write(self, text: str) -> int:
        written = len(text)
        self._total += written
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += text[:room]
            text = text[room:]
        self._tail += text
        if len(self._tail) > 2 * self._tail_limit:
            self._tail = self._tail[-self._tail_limit :]
        return written

    def writable(self) -> bool:
        return True

    def getvalue(self) -> str:
        cut = self._total - len(self._head) - self._tail_limit
        if cut <= 0:
            return self._head + self._tail
        return f"{self._head}\n[... {cut} characters truncated ...]\n{self._tail[-self._tail_limit:]}"


class Notebook:
    """The user's namespace plus Jupyter's display rules: trailing expressions, display(), plt.show()."""

    def __init__(self, image_files: list[int], out_dir: str):
        """`image_files`: descriptors of image_1.. that the daemon opened (this process never
        sees the host paths)."""
        from PIL import Image

        self._out_dir = out_dir
        self._cell = 0
        self._saved: list[str] = []
        self._not_returned = 0
        self.namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__, "display": self.display}
        for index, fd in enumerate(image_files, start=1):
            try:
                self.namespace[f"image_{index}"] = Image.open(os.fdopen(fd, "rb"))
            except Exception as error:  # noqa: BLE001 — re-raised naming the variable
                raise ValueError(f"cannot open image_{index}: {error}") from error

    def serve(self, requests, replies) -> None:
        """Run cells until the daemon hangs up."""
        while (request := read_message(requests)) is not None:
            send_message(replies, self.run(request["code"], request["cell"]))

    def run(self, code: str, cell: int) -> dict:
        _reap_children()  # what the daemon killed after the last cell: zombies would hold the pid limit
        self._cell, self._saved, self._not_returned = cell, [], 0
        stdout, stderr = BoundedText(), BoundedText()
        filename = f"<cell {cell}>"
        sys.stdout, sys.stderr = stdout, stderr
        try:
            self._execute(code, filename)
        except BaseException as error:  # noqa: BLE001 — a notebook reports everything, even SystemExit
            traceback.print_exception(type(error), error, _cell_frames(error.__traceback__, filename), file=stderr)
        try:
            self._show_open_figures()
        except Exception as error:  # noqa: BLE001 — a figure that cannot render is the user's bug
            traceback.print_exception(error, file=stderr)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        if self._not_returned:
            stderr.write(f"[{self._not_returned} more images not returned: at most {MAX_IMAGES} per cell]\n")
        return {"cell": cell, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "images": self._saved}

    def _execute(self, code: str, filename: str) -> None:
        # Tracebacks show the cell's source lines, as in Jupyter.
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), self.namespace)
            if value is not None:
                self.display(value)

    def display(self, *objects) -> None:
        """Jupyter's display(): images and figures are returned as PNG files, anything else printed."""
        for obj in objects:
            if _is_pil_image(obj):
                self._save(obj.save if obj.mode in _PNG_MODES else obj.convert("RGB").save)
            elif _is_figure(obj):
                self._save(obj.savefig)
                pyplot = sys.modules.get("matplotlib.pyplot")
                if pyplot is not None:
                    pyplot.close(obj)  # displayed once, not again when the cell ends
            else:
                print(repr(obj))

    def show(self, *args, **kwargs) -> None:
        """plt.show() under the inline backend: display every open figure, then close it."""
        self._show_open_figures()

    def _show_open_figures(self) -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        for number in pyplot.get_fignums():
            self.display(pyplot.figure(number))

    def _save(self, save) -> None:
        if len(self._saved) >= MAX_IMAGES:
            self._not_returned += 1
            return
        name = f"cell{self._cell:03d}_{len(self._saved) + 1:02d}.png"
        path = os.path.join(self._out_dir, name)
        save(path, format="png")
        self._saved.append(name)


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cell_frames(tb, filename: str):
    """The traceback from the cell's first frame on: the kernel's own frames are noise to the model."""
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb


def _is_pil_image(obj) -> bool:
    image_module = sys.modules.get("PIL.Image")
    return image_module is not None and isinstance(obj, image_module.Image)


def _is_figure(obj) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(obj, figure_module.Figure)


def install_inline_backend(notebook: Notebook) -> None:
    """Make plt.show() display the open figures through this notebook, as Jupyter's inline
    backend does: a backend module is matplotlib's own hook for show()."""
    import matplotlib.pyplot as pyplot
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    backend = types.ModuleType("deepeyes_inline")
    backend.show = notebook.show
    backend.FigureCanvas = FigureCanvasAgg
    sys.modules["deepeyes_inline"] = backend
    pyplot.switch_backend("module://deepeyes_inline")


def apply_limits(limits: dict) -> None:
    """rlimits for this process and everything it starts; set after start-up so they bind only user code."""
    mb = 1024 * 1024
    for name, value in (
        ("RLIMIT_AS", limits["memory_mb"] * mb),
        ("RLIMIT_NPROC", limits["max_processes"]),
        ("RLIMIT_FSIZE", limits["max_file_mb"] * mb),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    # SIGXCPU at the soft limit (the parent reports it), SIGKILL a second later if it is caught.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def read_message(channel) -> dict | None:
    header = channel.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(channel.read(size))


def send_message(channel, message: dict) -> None:
    data = json.dumps(message).encode()
    channel.write(struct.pack(">I", len(data)) + data)
    channel.flush()
