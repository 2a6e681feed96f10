"""``seq2seq serve``: load the checkpoints, bind the socket, run uvicorn until SIGTERM or Ctrl-C.

SIGTERM is a graceful stop: uvicorn stops accepting connections, every request already accepted
is answered (its sentences are decoded by the workers), the workers end, and the process exits
with 0.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
from typing import Any

from seq2seq.errors import Seq2SeqError, warn
from seq2seq.heap import release_freed_memory
from seq2seq.serve.metrics import Metrics
from seq2seq.serve.options import ServeOptions
from seq2seq.serve.pairs import LanguagePairs, ServedModel
from seq2seq.serve.process import LoadSpec, WorkerProcess


def serve_command(args: Any) -> int:
    """Serve every checkpoint of ``args.checkpoints`` until stopped; the exit code."""
    options = ServeOptions.from_args(args)  # before the models load: bad flags fail at once
    sock = bind(options.host, options.port)
    import uvicorn

    protocol = header_deadline(options.timeout)  # before the models load: it may warn

    from seq2seq.serve.app import build_app

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
        warn_threads(options.threads, len(args.checkpoints))
    elif len(args.checkpoints) > 1:  # each decodes in a process of its own, on every CPU
        options = dataclasses.replace(options, threads=shared_threads(len(args.checkpoints)))
        print(f"note: {len(args.checkpoints)} models share the CPUs: {options.threads} "
              f"thread{'s' if options.threads > 1 else ''} each (--threads to choose)",
              file=sys.stderr)
    metrics = Metrics()
    pairs = LanguagePairs([load_model(path, args, options, metrics) for path in args.checkpoints])
    pairs.start()  # each worker process loads its model; a failure is one line here
    app = build_app(pairs, options, metrics)
    host, port = sock.getsockname()[:2]
    for model in pairs.models.values():
        print(f"serving {model.source}->{model.target} from {model.checkpoint} (beam "
              f"{model.settings.beam_size}, alpha {model.settings.alpha:g}, "
              f"{model.worker.precision})", file=sys.stderr)
        if model.worker.precision == "bf16":
            print("note: bf16 products round differently at different batch sizes, so an "
                  "answer can differ from translate's where two hypotheses score within that "
                  "rounding (fp32 and --quantize answer exactly)", file=sys.stderr)
    print(f"listening on http://{url_host(host)}:{port} (batches of up to {options.batch_size} "
          f"sentences, {options.batch_wait_ms:g} ms wait)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            http=protocol,
                            timeout_graceful_shutdown=int(options.timeout) + 5)
    # uvicorn turns SIGTERM into a graceful shutdown and afterwards re-raises it to the handler
    # that was there before; an empty handler makes that last step a no-op, so exit code is 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("stopped: every accepted request was answered", file=sys.stderr)
    return 0


def shared_threads(models: int, default: int | None = None) -> int:
    """The threads of each of ``models`` decoding processes by default: torch's default in
    this process (``default``; one per core, at most the CPU quota, ``OMP_NUM_THREADS``
    respected) shared among them. Each process's own default had them take turns on the
    CPUs whenever two models decoded at once."""
    if default is None:
        import torch

        default = torch.get_num_threads()  # (capped at the CPU quota by cli.main)
    return max(1, default // models)


def warn_threads(threads: int, models: int, cpus: int | None = None) -> None:
    """Say when the models' decoding processes, ``threads`` each, ask for more threads than
    the CPUs this process may use (``cpus``, default this machine's): they would take turns."""
    from seq2seq.cpuinfo import threads_problem

    problem = threads_problem("--threads", threads, models, "decoding processes (one per model)",
                              "decoding", cpus)
    if problem:
        warn(problem)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free one), so the port is known early."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now, not once the models are loaded: a second server on this port is
        # refused here (two sockets may bind one address with SO_REUSEADDR until one listens).
        sock.listen(2048)
    except OSError as error:
        raise Seq2SeqError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def header_deadline(timeout_s: float) -> Any:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete
    within ``timeout_s`` of its opening or of the request's first byte: uvicorn times out
    neither, so a client that sends nothing, or stops half way through its headers, held a
    connection for ever. (Idle keep-alive connections close after uvicorn's 5 s.) Where
    httptools is missing, uvicorn's own choice, with a warning."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        warn("httptools is not installed (pip install 'seq2seq[serve]'): a connection that "
             "stalls before its request headers are complete is not closed")
        return "auto"

    class HeaderDeadline(HttpToolsProtocol):
        deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.deadline = self.loop.call_later(timeout_s, self._late)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _late(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def load_model(path: str, args: Any, options: ServeOptions, metrics: Metrics) -> ServedModel:
    """One checkpoint with its settings (the decoding flags over its recipe) and its worker
    process, not started."""
    from seq2seq.config import min_len_warnings
    from seq2seq.translate import Translator

    # This process only needs the recipe, tokenizer and lexicon, for the settings of each
    # request; it loads the weights on the CPU and lets them go.
    translator = Translator.from_checkpoint(path, device="cpu")
    translator.model = None
    release_freed_memory()
    settings = translator.decode_settings(beam=args.beam, alpha=args.alpha,
                                          max_len_ratio=args.max_len_ratio,
                                          batch_tokens=args.batch_tokens,
                                          shortlist=args.shortlist)
    given = {"max_len_ratio": "--max-len-ratio"} if args.max_len_ratio is not None else {}
    for message in min_len_warnings(settings, given):
        warn(f"{path}: {message}")
    source, target = translator.recipe.data.src_lang, translator.recipe.data.trg_lang
    pair = f"{source}-{target}"
    spec = LoadSpec(checkpoint=str(path), device=args.device, quantize=args.quantize,
                    precision=args.precision, threads=options.threads)
    worker = WorkerProcess(spec, options.batch_size, options.batch_wait_ms / 1000,
                           options.queue_size, on_batch=metrics.on_batch(pair),
                           on_translated=metrics.on_translated(pair), name=f"decode-{pair}")
    metrics.watch_queue(pair, lambda: worker.queued)
    return ServedModel(source=source, target=target, checkpoint=str(path),
                       translator=translator, settings=settings, worker=worker)
