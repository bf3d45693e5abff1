"""Multi-host on DTensor's multi-client runtime, with real processes on loopback ports (no mocks).

The tests read runs of examples/launch_local.py: two client processes with two logical CPU devices
each (a mesh of 4 spanning both), or one process with four devices as the reference; the runs of all
selected tests start together (fixture `launched`). The pytest process's own 8 devices play no part.
"""

import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import keras_lwp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "examples", "launch_local.py")
# A plan that is not data parallelism and crosses clients: the mesh is 2x2 with x across the two
# clients and y within each; conv1 splits its batch on x and its output channels on y, fc1 splits
# its output channels on x (model parallelism across the clients); the search does the rest. The
# model's random layers (dropout, noise) must draw on both clients what the single process draws.
PLAN = ["--model=noisy_cnn", "--mesh=2x2", "--strategy=auto", "--override=conv1=sample:x,channel:y",
        "--override=fc1=channel:x", "--batch_size=16", "--steps=3"]


# The failure runs: a small MLP, OWT across the clients, a 3 s heartbeat; the launcher kills a client
# still running 4 s after another failed.
FAILING = ["--model=mlp", "--mesh=2x2", "--strategy=owt", "--steps=3", "--heartbeat_timeout=3",
           "--register_timeout=5", "--grace=4", "--timeout=100"]
RUNS = {
    # client 1 starts from other random weights and seeds: parallelize must give it client 0's
    "multi": PLAN + ["--out={tmp}/multi", "--differ=1:weights"],
    "single": PLAN + ["--out={tmp}/single", "--single"],
    "exit": FAILING + ["--die_client=1", "--die_after_step=1", "--die_how=exit"],
    "hang": FAILING + ["--die_client=0", "--die_after_step=1", "--die_how=hang"],
    "absent": FAILING + ["--skip_client=1"],
    # No short timeouts here: under load a client can be seconds behind the other, and the mismatch
    # must be reported by both, not turned into a timeout.
    "plan": ["--model=mlp", "--mesh=2x2", "--strategy=owt", "--steps=3", "--grace=30", "--timeout=100",
             "--differ=1:plan"],
}
RUNS_OF_TEST = {
    "test_two_clients_train_to_the_weights_of_one_process": ("multi", "single"),
    "test_a_client_that_dies_makes_the_others_fail_clearly[client1-exits]": ("exit",),
    "test_a_client_that_dies_makes_the_others_fail_clearly[client0-hangs]": ("hang",),
    "test_a_client_that_never_starts_makes_the_others_fail_clearly": ("absent",),
    "test_clients_with_different_plans_refuse_to_train": ("plan",),
}
TIMEOUT = 150  # seconds from the start of all runs; every run bounds itself well below (--timeout=100)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """Start, all at once, the launch_local.py runs the selected tests of this module need, and give
    each test the return code and output of its runs. Started together because they mostly wait
    (for each other, heartbeats, timeouts), so the module takes about as long as its slowest run."""
    tmp = tmp_path_factory.mktemp("multihost")
    selected = {item.name for item in request.session.items if item.module is request.module}
    wanted = sorted({run for test in selected for run in RUNS_OF_TEST.get(test, ())})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTENSOR_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    started = time.monotonic()
    processes = {}
    for name in wanted:
        log = open(tmp / f"{name}.log", "w")
        processes[name] = (subprocess.Popen([sys.executable, LAUNCH, *(a.format(tmp=tmp) for a in RUNS[name])],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                            start_new_session=True), log)
    results = {}

    def result(name):
        if name not in results:
            process, log = processes[name]
            try:
                process.wait(timeout=max(1.0, started + TIMEOUT - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
            output = (tmp / f"{name}.log").read_text()
            if process.returncode == -signal.SIGKILL:
                pytest.fail(f"launch_local.py ({name}) did not finish within {TIMEOUT} s (hung):\n{output[-4000:]}")
            results[name] = (process.returncode, output)
        return results[name]

    yield types.SimpleNamespace(result=result, tmp=tmp)
    for process, log in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def exit_time(output, client):
    found = re.search(rf"^client {client} exited with code (-?\d+) after ([\d.]+) s", output, re.M)
    assert found, f"client {client} did not exit by itself:\n{output[-4000:]}"
    return int(found.group(1)), float(found.group(2))


def assert_close(actual, expected, what):
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= 1e-5, f"{what}: two clients differ from one process by {error:.2e} (of the largest value)"


def test_two_clients_train_to_the_weights_of_one_process(launched):
    code, output = launched.result("multi")
    single_code, single_output = launched.result("single")
    assert code == 0, output[-4000:]
    assert single_code == 0, single_output[-4000:]
    assert "Strategy 'auto' on Mesh(x=2, y=2, CPU)" in output
    assert re.search(r"^\[client 0\] conv1 .*\{n=x, c=y\}", output, re.M), output
    assert re.search(r"^\[client 0\] fc1 .*\{c=x\}", output, re.M), output
    assert "all 2 exited cleanly" in output
    multi_weights = np.load(launched.tmp / "multi" / "weights.npz")
    single_weights = np.load(launched.tmp / "single" / "weights.npz")
    assert len(multi_weights.files) == len(single_weights.files) == 6
    for name in single_weights.files:
        assert_close(multi_weights[name], single_weights[name], f"weight {name}")
    multi_results = np.load(launched.tmp / "multi" / "results.npz")
    single_results = np.load(launched.tmp / "single" / "results.npz")
    assert len(single_results["losses"]) == 3 and single_results["losses"][0] != single_results["losses"][-1]
    for name in ("losses", "evaluate", "predict"):
        assert_close(multi_results[name], single_results[name], name)


@pytest.mark.parametrize("run, who", [("exit", 1), ("hang", 0)], ids=["client1-exits", "client0-hangs"])
def test_a_client_that_dies_makes_the_others_fail_clearly(launched, run, who):
    # "exit": client 1 exits abruptly (os._exit) after the first step; the next collective fails at once.
    # "hang": client 0, which hosts the coordination service, stops (SIGSTOP) after the first step;
    # only the heartbeat timeout (3 s) can tell.
    code, output = launched.result(run)
    other = 1 - who
    assert code == 1, output[-4000:]
    failed = re.search(rf"^\[client {who}\] client {who}: {'dying' if run == 'exit' else 'hanging'} on purpose "
                       r"\(--die_client\) at t=([\d.]+)", output, re.M)
    noticed = re.search(rf"client {other}: FAILED at t=([\d.]+) because another client failed \(\w+Error\): .*"
                        r"Collective ops is aborted by: .*(Connection reset by peer|Socket closed|"
                        r"stopped sending heartbeats|Heartbeat)", output)
    assert failed and noticed, output[-4000:]
    assert float(noticed.group(1)) - float(failed.group(1)) < 30, output[-4000:]  # seconds
    assert exit_time(output, other)[0] == 3, output[-4000:]  # launch_local's "failed because another client did"
    if run == "exit":
        assert exit_time(output, who)[0] == 17
        assert "killed by the launcher" not in output
    else:
        assert f"client {who} hung (killed by the launcher)" in output, output[-4000:]


def test_a_client_that_never_starts_makes_the_others_fail_clearly(launched):
    code, output = launched.result("absent")
    assert code == 1, output[-4000:]
    assert exit_time(output, 0)[0] == 3, output[-4000:]
    assert re.search(r"client 0: FAILED at t=[\d.]+ because another client failed \(ClientFailedError\): Client 0 could not "
                     r"join the cluster .* within register_timeout=5 s .*Wait_for_all_tasks_to_register.*"
                     r"/job:worker/replica:0/task:1", output), output[-4000:]
    assert "FAILED: client 1 never started" in output


def test_clients_with_different_plans_refuse_to_train(launched):
    code, output = launched.result("plan")
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
