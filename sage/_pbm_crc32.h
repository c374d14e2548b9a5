/* CRC-32 with zlib's parameters (the reflected IEEE 802.3 polynomial 0xEDB88320, initial and final
 * XOR 0xFFFFFFFF): pbm_crc32(crc32(a), b) == zlib.crc32(a + b), as sage/layout.py specifies. */
#ifndef SAGE_PBM_CRC32_H
#define SAGE_PBM_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* Call once before pbm_crc32 (builds the tables, picks the CPU path). */
void pbm_crc32_init(void);
/* The CRC of `len` bytes continuing from `crc` (0 to start), like zlib.crc32(data, crc). */
uint32_t pbm_crc32(uint32_t crc, const void *data, size_t len);
/* The same with the CPU path turned off (tests compare both against zlib). */
uint32_t pbm_crc32_portable(uint32_t crc, const void *data, size_t len);
/* "vpclmul", "pclmul" or "table": which implementation pbm_crc32 uses on this CPU. */
const char *pbm_crc32_impl(void);

#endif
