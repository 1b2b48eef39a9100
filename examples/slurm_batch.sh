#!/bin/sh
# The seed's workflow (examples/slurm.py) inside a batch job of two whole nodes:
#
#     sbatch --wait examples/slurm_batch.sh      # from the checkout; then cat workflow.out
#
# Inside the allocation each block is a step of it, on the node where the pool has
# fewest: no job is submitted, and the allocation's nodes and cores are shared by the
# blocks (--exact). What the workflow prints goes to workflow.out, its log to workflow.log.
#SBATCH --job-name=workflow
#SBATCH --nodes=2
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --output=workflow.out
#SBATCH --error=workflow.log
exec python examples/slurm.py "$@"
