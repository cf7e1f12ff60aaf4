"""The long-running process `tes up` starts: it serves the `train-export-serve/default` and `benchmark/default`
deployments.

Each `prefect deployment run` is picked up within about a second (PREFECT_RUNNER_POLL_FREQUENCY=1) and runs
in a fresh subprocess.
"""

from prefect import serve

from flows.prefect_flow import benchmark_flow, train_export_serve
from flows.stack import DEPLOYMENT_NAME

if __name__ == "__main__":
    serve(
        train_export_serve.to_deployment(name=DEPLOYMENT_NAME),
        benchmark_flow.to_deployment(name=DEPLOYMENT_NAME),
        print_starting_message=False,
    )
