"""Multi-host on DTensor's multi-client runtime, with real processes on loopback ports (no mocks).

Every test runs examples/launch_local.py: two client processes with two logical CPU devices each (a
mesh of 4 spanning both), or one process with four devices as the reference. The pytest process's
own 8 devices play no part.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_lwp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "examples", "launch_local.py")
# A plan that is not data parallelism and crosses clients: the mesh is 2x2 with x across the two
# clients and y within each; conv2 splits its batch on x and its output channels on y, fc1 splits
# its output channels on x (model parallelism across the clients); the search does the rest.
PLAN = ["--model=small_cnn", "--mesh=2x2", "--strategy=auto", "--override=conv2=sample:x,channel:y",
        "--override=fc1=channel:x", "--batch_size=16", "--steps=3"]


def start(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTENSOR_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.Popen([sys.executable, LAUNCH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env, start_new_session=True)


def finish(process, timeout):
    """The launcher's return code and output; kill it and its clients if it runs past `timeout`."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"launch_local.py did not finish within {timeout} s (hung):\n{output[-4000:]}")
    return process.returncode, output


def exit_time(output, client):
    found = re.search(rf"^client {client} exited with code (-?\d+) after ([\d.]+) s", output, re.M)
    assert found, f"client {client} did not exit by itself:\n{output[-4000:]}"
    return int(found.group(1)), float(found.group(2))


def assert_close(actual, expected, what):
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= 1e-5, f"{what}: two clients differ from one process by {error:.2e} (of the largest value)"


def test_two_clients_train_to_the_weights_of_one_process(tmp_path):
    # Client 1 starts from other random weights: parallelize must give it client 0's.
    multi = start(*PLAN, f"--out={tmp_path / 'multi'}", "--differ=1:weights")
    single = start(*PLAN, f"--out={tmp_path / 'single'}", "--single")
    code, output = finish(multi, 120)
    single_code, single_output = finish(single, 120)
    assert code == 0, output[-4000:]
    assert single_code == 0, single_output[-4000:]
    assert "Strategy 'auto' on Mesh(x=2, y=2, CPU)" in output
    assert re.search(r"^\[client 0\] conv2 .*\{n=x, c=y\}", output, re.M), output
    assert re.search(r"^\[client 0\] fc1 .*\{c=x\}", output, re.M), output
    assert "all 2 exited cleanly" in output
    multi_weights = np.load(tmp_path / "multi" / "weights.npz")
    single_weights = np.load(tmp_path / "single" / "weights.npz")
    assert len(multi_weights.files) == len(single_weights.files) == 8
    for name in single_weights.files:
        assert_close(multi_weights[name], single_weights[name], f"weight {name}")
    multi_results = np.load(tmp_path / "multi" / "results.npz")
    single_results = np.load(tmp_path / "single" / "results.npz")
    assert len(single_results["losses"]) == 3 and single_results["losses"][0] != single_results["losses"][-1]
    for name in ("losses", "evaluate", "predict"):
        assert_close(multi_results[name], single_results[name], name)


@pytest.mark.parametrize("how, who", [("exit", 1), ("hang", 0)], ids=["client1-exits", "client0-hangs"])
def test_a_client_that_dies_makes_the_other_fail_clearly(how, who):
    # "exit": client 1 exits abruptly after the first step; the next collective fails at once.
    # "hang": client 0 (the coordination service's host) stops (SIGSTOP) after the first step; only
    # the heartbeat timeout (3 s here) can tell. The launcher kills a hung client 4 s after the other failed.
    started = time.monotonic()
    code, output = finish(start("--model=mlp", "--mesh=2x2", "--strategy=owt", "--steps=3", f"--die_client={who}",
                                "--die_after_step=1", f"--die_how={how}", "--heartbeat_timeout=3", "--grace=4",
                                "--timeout=100"), 110)
    other = 1 - who
    assert code == 1, output[-4000:]
    assert f"client {who}: {'dying' if how == 'exit' else 'hanging'} on purpose" in output
    survivor_code, survivor_time = exit_time(output, other)
    assert survivor_code == 3, output[-4000:]  # failed on its own, with launch_local's "another client failed"
    assert re.search(rf"client {other}: FAILED because another client failed \(\w+Error\): .*"
                     r"Collective ops is aborted by: .*(Connection reset by peer|stopped sending heartbeats|"
                     r"Heartbeat)", output), output[-4000:]
    if how == "exit":
        died_code, died_time = exit_time(output, who)
        assert died_code == 17
        assert survivor_time - died_time < 30, output[-4000:]
        assert "killed by the launcher" not in output
    else:
        assert f"client {who} killed by the launcher" in output
        assert f"client {who} hung (killed by the launcher)" in output
    assert time.monotonic() - started < 90


def test_clients_with_different_plans_refuse_to_train():
    code, output = finish(start("--model=mlp", "--mesh=2x2", "--strategy=owt", "--differ=1:plan", "--timeout=100"),
                          110)
    assert code == 1, output[-4000:]
    for client in (0, 1):
        assert re.search(rf"^\[client {client}\] keras_lwp.multihost.ClientMismatchError: The clients do not agree "
                         r"on the plan of model 'mlp'", output, re.M), output[-4000:]
        assert exit_time(output, client)[0] == 1
    assert "step 1" not in output


def test_initialize_refuses_inconsistent_arguments():
    with pytest.raises(ValueError, match="'host:port'"):
        keras_lwp.initialize(0, jobs="localhost")
    with pytest.raises(ValueError, match="num_clients=3 but 2 job address"):
        keras_lwp.initialize(0, num_clients=3, jobs="localhost:1,localhost:2")
    with pytest.raises(ValueError, match=r"client_id must be in \[0, 2\)"):
        keras_lwp.initialize(2, jobs=["localhost:1", "localhost:2"])
    assert keras_lwp.multihost.cluster() is None and not keras_lwp.multihost.is_multi_client()
