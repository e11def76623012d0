#!/usr/bin/env bash
# Syntax- and type-check every CUDA binding (csrc/cuda/*_binding.cpp) against the installed torch's headers and the
# CUDA toolkit's, as setup.py's CUDAExtension would compile them; see tools/cuda_stubs/README.md.
# Usage: tools/binding_check.sh PYTHON NVCC
set -euo pipefail
py=$1 nvcc=$2
root=$(cd "$(dirname "$0")/.." && pwd)
# the toolkit's include flags, as nvcc itself reports them (nvcc may be a wrapper script)
cuda_includes=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="\(.*\)" *$/\1/p')
flags=$("$py" -c "from torch.utils.cpp_extension import include_paths; import sysconfig
print(' '.join(['-I' + p for p in include_paths()] + ['-I' + sysconfig.get_paths()['include']]))")
status=0
for src in "$root"/csrc/cuda/*_binding.cpp; do
  ${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Werror -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -I"$root/csrc/include" $flags $cuda_includes -idirafter "$root/tools/cuda_stubs" "$src" || status=1
done
[ $status -eq 0 ] && echo "binding-check: $(ls "$root"/csrc/cuda/*_binding.cpp | wc -l) CUDA bindings compile"
exit $status
