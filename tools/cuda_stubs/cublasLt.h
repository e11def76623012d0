#pragma once
// Stand-in (see README.md).
typedef struct cublasLtContext* cublasLtHandle_t;
