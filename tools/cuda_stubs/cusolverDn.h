#pragma once
// Stand-in (see README.md).
#include <cusolver_common.h>
typedef struct cusolverDnContext* cusolverDnHandle_t;
