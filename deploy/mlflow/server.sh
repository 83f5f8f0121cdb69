#!/usr/bin/env bash
# MLflow tracking server on Postgres, artifacts proxied by the server (--serve-artifacts) to a
# folder or an S3-compatible bucket. Workers set MLFLOW_TRACKING_URI=http://<host>:5000 and
# leave SWAY_MLFLOW_ARTIFACTS unset (the server's artifact root is used). docs/DEPLOY.md.
#   MLFLOW_PG_URI       postgresql://mlflow:<password>@<host>:5432/mlflow (the driver, psycopg 3,
#                       comes with `pip install sway[postgres]`)
#   MLFLOW_ARTIFACTS    /shared/mlartifacts, or s3://bucket/mlflow (with MLFLOW_S3_ENDPOINT_URL
#                       and AWS_* credentials for an S3-compatible store; pip install boto3)
set -euo pipefail
: "${MLFLOW_PG_URI:?set MLFLOW_PG_URI=postgresql://user:password@host:5432/db}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_PG_URI" \
  --artifacts-destination "${MLFLOW_ARTIFACTS:-/shared/mlartifacts}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}"
