"""``python -m sglang_deft.launch_server ARGS``: SGLang's HTTP server with the ``deft`` backend.

Takes every ``python -m sglang.launch_server`` argument; ``deft`` is valid for ``--attention-backend``
and ``--decode-attention-backend``. On top of SGLang's launcher it:
1. sets the process up for the device (``--device``, else a ``--config`` file's ``device:``, else CUDA if
   present and ``SGLANG_USE_CPU_ENGINE=1`` is not set, else CPU with ``sglang_deft.cpu_compat``) before
   SGLang loads;
2. registers ``deft`` (CLI choice, backend registry) before parsing;
3. turns ``--attention-backend deft`` into deft for decode plus SGLang's triton (GPU) or
   torch_native (CPU) backend for prefill/extend;
4. refuses configurations deft cannot serve (``sglang_deft.config_checks``), naming flag and reason;
5. starts SGLang's HTTP server with scheduler/detokenizer entries from ``sglang_deft.subprocess_entry``,
   which register ``deft`` in those spawned processes; without deft, ``--grpc-mode``, ``--use-ray`` and
   ``--encoder-only`` start SGLang's own server for them (``sglang.launch_server.run_server``).

Nothing here imports SGLang at module level: spawned processes re-import this module as
``__mp_main__`` before the CPU compatibility layer is back in place.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def config_flag_spelled_out(argv: list[str]) -> list[str]:
    """``argv`` with the config file flag as SGLang's merger finds it, a separate ``--config FILE``:
    argparse also takes ``--config=FILE`` and abbreviations (``--conf FILE``), whose file the merger would
    skip without a word while the rest of the launcher read it."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if len(flag) >= len("--conf") and "--config".startswith(flag):  # "--con" is ambiguous to argparse
            out += ["--config", value] if eq else ["--config"]
        else:
            out.append(arg)
    return out


class _PreParseError(Exception):
    pass


class ConfigFileError(ValueError):
    """A ``--config`` file SGLang's merger cannot use (none given, not YAML, missing, not a mapping, an option it
    cannot set): a usage error, reported as one instead of the merger's traceback."""


class _PreParser(argparse.ArgumentParser):
    def error(self, message):  # a malformed command line is SGLang's parser's to report, with its usage
        raise _PreParseError(message)


def merge_config_quietly(merger, argv: list[str]) -> list[str]:
    """``merger.merge_config_with_args(argv)`` without its log line on a file YAML cannot read: the launcher's
    error says the same, after the line had come twice (once per merge) amid SGLang's startup warnings."""
    log = logging.getLogger(type(merger).__module__)
    was = log.disabled
    log.disabled = True
    try:
        return merger.merge_config_with_args(argv)
    except (AttributeError, TypeError) as e:
        # SGLang's merger calls key.replace(...): a key YAML did not read as a string (``on:``, ``yes:``, ``1:``) raised
        # AttributeError out of the launcher as a traceback, not the usage error an unusable file is.
        raise ValueError(f"a key of the config file is no option name ({e}); YAML reads unquoted on/off/yes/no "
                         "as booleans and digits as numbers: write option names as keys") from e
    finally:
        log.disabled = was


def _device_arg(argv: list[str]) -> str | None:
    """``--device`` from the command line, else from a ``--config`` file (SGLang's merge lets the command
    line override the file); read before SGLang loads, so without its parser. argparse takes the file
    as ``--config=FILE`` and abbreviated (``--conf FILE``) too, as ``parse_server_args`` does, and a file's
    key as abbreviated as a flag (``dev: cpu``). None where SGLang's parser or merger will refuse the
    arguments (with its own message)."""
    try:
        import yaml
        # SGLang's own merger, so that the file is read as it will be. Importing it loads SGLang's frontend
        # package but not torch: nothing has looked for a device yet.
        from sglang.srt.server_args_config_parser import ConfigArgumentMerger
    except ImportError:  # no SGLang, or another release: prepare_process names the one deft needs
        return None
    # Without SGLang's parser: the entries the merger writes are only searched for --device.
    parser = _PreParser(add_help=False)
    parser.add_argument("--device", default=None)
    try:
        argv = merge_config_quietly(ConfigArgumentMerger(), config_flag_spelled_out(argv))
        return parser.parse_known_args(argv)[0].device
    except (OSError, ValueError, yaml.YAMLError, _PreParseError):
        return None


def parse_server_args(argv: list[str], device: str):
    """ServerArgs from the command line, with ``deft`` registered and ``--attention-backend deft``
    split for ``device`` (``server_setup.split_deft_backend``). Call ``server_setup.prepare_process``
    first: it returns ``device``."""
    from sglang.srt.server_args import ServerArgs

    from sglang_deft.registration import register
    from sglang_deft.server_setup import make_server_args, split_deft_backend

    register()
    parser = argparse.ArgumentParser(prog="python -m sglang_deft.launch_server")
    ServerArgs.add_cli_args(parser)
    # sglang.launch_server parses "--config=FILE" and "--conf FILE" and ignores their files.
    argv = config_flag_spelled_out(argv)
    if "--config" in argv:  # as sglang.srt.server_args.prepare_server_args does
        given = argv[argv.index("--config") + 1:][:1]
        if given == [""]:  # (--config= or --config ""): the merger takes an empty path for no --config at all
            raise ConfigFileError("--config: No config file specified (an empty path)")
        import yaml
        from sglang.srt.server_args_config_parser import ConfigArgumentMerger

        try:
            argv = merge_config_quietly(ConfigArgumentMerger(parser), argv)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ConfigFileError(f"--config: {e}") from e
    raw_args = parser.parse_args(argv)
    split_deft_backend(vars(raw_args), device)
    return make_server_args(lambda: ServerArgs.from_cli_args(raw_args), vars(raw_args), device)


# Tests on CPU only: SGLang's scheduler and detokenizer forked from the launcher instead of spawned. A spawned
# process is a fresh interpreter that imports SGLang again (~15 s of CPU each on the 2-core CI machine, two thirds
# of a tiny server's start; forked, it inherits the launcher's imports), and the suite starts ~40 servers. The
# spawned path, which is what users run (``subprocess_entry`` registers deft there), stays covered by the servers
# started without it (conftest's tiny_servers).
FORK_CHILDREN_ENV = "SGLANG_DEFT_FORK_CHILDREN"


def fork_sglang_children(device: str) -> None:
    """Make SGLang's ``mp.set_start_method("spawn", force=True)`` (its launch sets it before starting the scheduler
    and detokenizer) choose fork in this process. Refused on CUDA: a process that has initialised CUDA cannot fork
    children that use it."""
    if device != "cpu":
        raise ValueError(f"{FORK_CHILDREN_ENV}=1 is for servers on the CPU (tests); this one runs on {device}, whose "
                         "children must be spawned")
    import multiprocessing

    set_start_method = multiprocessing.set_start_method

    def fork_instead_of_spawn(method, force=False):
        set_start_method("fork" if method == "spawn" else method, force=force)

    multiprocessing.set_start_method = fork_instead_of_spawn
    print(f"sglang_deft.launch_server: SGLang's scheduler and detokenizer are forked from the launcher, not spawned "
          f"({FORK_CHILDREN_ENV}=1)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    from sglang_deft.server_setup import check_startup, prepare_process

    from sglang_deft.server_process import end_with_parent_process

    end_with_parent_process()  # started by a ServerProcess: end with that process, from whichever thread it came
    argv = list(sys.argv[1:] if argv is None else argv)
    from sglang_deft.patches.sglang_version import UnsupportedSGLangVersion

    try:
        device = prepare_process(_device_arg(argv))
        if os.environ.get(FORK_CHILDREN_ENV) == "1":
            fork_sglang_children(device)
    except (ValueError, UnsupportedSGLangVersion) as e:  # --device against this machine (or forking), SGLang's release
        print(f"sglang_deft.launch_server: {e}", file=sys.stderr)
        sys.exit(2)
    from sglang.srt.utils.common import suppress_noisy_warnings

    suppress_noisy_warnings()  # as sglang.launch_server does
    from sglang_deft.config_checks import UnsupportedConfiguration

    try:
        server_args = parse_server_args(argv, device)
        check_startup(server_args)
    except (UnsupportedConfiguration, ConfigFileError, UnsupportedSGLangVersion) as e:  # the user's flags, file or
        # model, or an SGLang whose patched functions differ from the release's: the reasons, not a traceback; 2 as
        # argparse
        print(f"sglang_deft.launch_server: {e}", file=sys.stderr)
        sys.exit(2)
    if not 0 <= server_args.port <= 65535:  # else the port check below fails with bind()'s OverflowError
        print(f"sglang_deft.launch_server: --port {server_args.port} is not a TCP port (0-65535)", file=sys.stderr)
        sys.exit(2)
    from sglang_deft.server_process import PORT_IN_USE, port_free

    if not (server_args.grpc_mode or server_args.use_ray or server_args.encoder_only) and not port_free(
            server_args.port, server_args.host):
        # SGLang binds its HTTP port only after loading the model, and on failure its launcher then polls the
        # port it could not bind for minutes (120 tries of 5 s) before it exits.
        sys.exit(f"sglang_deft.launch_server: {server_args.host}:{server_args.port} {PORT_IN_USE}; "
                 "pass --port with a free port")

    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.utils import kill_process_tree

    from sglang_deft.subprocess_entry import run_detokenizer_process, run_scheduler_process

    try:
        if server_args.grpc_mode or server_args.use_ray or server_args.encoder_only:
            # Servers other than the HTTP one, which check_startup refuses for deft: SGLang's own launch.
            from sglang.launch_server import run_server

            run_server(server_args)
        else:
            launch_server(
                server_args,
                run_scheduler_process_func=run_scheduler_process,
                run_detokenizer_process_func=run_detokenizer_process,
            )
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
