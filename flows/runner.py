"""The long-running process `tes up` starts: it serves the `train-export-serve/default` deployment.

Each `prefect deployment run` is picked up within about a second (PREFECT_RUNNER_POLL_FREQUENCY=1) and runs
in a fresh subprocess.
"""

from flows.prefect_flow import train_export_serve
from flows.stack import DEPLOYMENT_NAME

if __name__ == "__main__":
    train_export_serve.serve(name=DEPLOYMENT_NAME, print_starting_message=False)
