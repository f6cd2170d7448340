"""One img2dataset run for `tfds_product1m.download`: `python img2dataset_pass.py ARGS.json`.

Run by path in its own process, never imported: img2dataset starts its workers with `spawn`, and
each worker re-imports the main module, so this module imports nothing of the project (whose
package imports TensorFlow). ARGS.json holds `img2dataset.download`'s keyword arguments.
"""

import json
import os
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        kwargs = json.load(f)
    if kwargs.get("distributor") == "pyspark":
        # img2dataset uses the active session, else makes a local one. getOrCreate() reads the
        # cluster from Spark's own configuration (PYSPARK_SUBMIT_ARGS="--master URL pyspark-shell"
        # or spark-defaults.conf), so a cluster is chosen the usual Spark way.
        from pyspark.sql import SparkSession

        SparkSession.builder.appName("product1m-download").getOrCreate()
    # (Ray: its workers join the cluster named by RAY_ADDRESS, else a local one is started.)
    import img2dataset  # After the guard below: workers must not start a download of their own.

    img2dataset.download(**kwargs)


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # No update check against PyPI.
    main()
