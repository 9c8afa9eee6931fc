"""console.third_party: a command keeps third-party log output out of sight unless --verbose."""
import subprocess
import sys
import textwrap



def test_third_party_logs_are_silenced_at_their_source_unless_verbose(subprocess_env):
    script = textwrap.dedent("""
        import argparse, logging, os, sys
        from vggjax.utils import console
        parser = argparse.ArgumentParser()
        console.add_verbose(parser)
        args = parser.parse_args(sys.argv[1:])
        console.third_party(args.verbose)
        logging.basicConfig()  # as jax2onnx does: every record would print
        logging.getLogger("onnx_ir.serde").warning("The value type for shape [1] is not known.")
        logging.getLogger("asyncio").error("Future exception was never retrieved")
        logging.getLogger("vggjax").warning("note: vggjax's own")
        print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
    """)
    env = {k: v for k, v in subprocess_env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet, verbose = (subprocess.run([sys.executable, "-c", script, *extra], env=env, capture_output=True,
                                     text=True, timeout=60) for extra in ([], ["--verbose"]))
    assert (quiet.stdout, quiet.stderr) == ("2\n", "WARNING:vggjax:note: vggjax's own\n")
    assert verbose.stdout == "None\n" and "not known" in verbose.stderr and "never retrieved" in verbose.stderr
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # the user's own setting wins
    assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=60).stdout == "0\n"
