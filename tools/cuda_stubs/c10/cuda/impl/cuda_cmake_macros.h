#pragma once
// Stand-in (see README.md).
