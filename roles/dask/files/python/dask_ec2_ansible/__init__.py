"""dask-ec2-ansible's Python side: the cluster object (``Cluster``), in every cluster's environment and in the
controller's .venv."""

from .cluster import Cluster, ScalingError, ScalingWarning

__all__ = ["Cluster", "ScalingError", "ScalingWarning"]
