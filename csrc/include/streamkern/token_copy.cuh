// Torch-free launcher of the token-row copy under ring_write_ and bank_insert_ (see streamkern/token_copy.h for
// what is copied where). One launch covers k and v of every layer.
#pragma once
#include <cuda_runtime.h>

#include "streamkern/common.h"
#include "streamkern/token_copy.h"

namespace streamkern {

// Copies the 2*NL*B*T token rows of `p` (element type `dtype`) on `stream`: one block per row, grid-stride over
// rows, 16-byte vector loads/stores when every row start is 16-byte aligned and the source rows are contiguous,
// an element loop over the source's (h, d) strides otherwise. Rows whose index is out of range are skipped.
LaunchStatus token_copy_launch(const TokenCopyParams& p, DType dtype, cudaStream_t stream);

}  // namespace streamkern
