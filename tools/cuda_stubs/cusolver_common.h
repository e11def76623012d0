#pragma once
// Stand-in (see README.md).
typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;
