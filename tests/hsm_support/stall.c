/* A PKCS#11 module for the tests: every call goes to the module named by
 * TSA_TEST_STALL_MODULE (SoftHSM2), except that C_Sign does not return while the file named by
 * TSA_TEST_STALL_FILE exists (it looks every 10 ms): an HSM that stops answering. cryptoki copies
 * the function list once, at load, so only C_GetFunctionList is exported (no C_GetInterface).
 *
 * No PKCS#11 header is needed: the list is the version and 68 function pointers (PKCS#11 2.40,
 * CK_FUNCTION_LIST), and C_Sign is the 44th of them. */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUNCTIONS 68
#define C_SIGN 43
#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL
#define CKR_ARGUMENTS_BAD 7UL

typedef unsigned long ck_ulong;

struct function_list {
    unsigned char version[2];
    void (*functions[FUNCTIONS])(void);
};

typedef ck_ulong (*sign_fn)(ck_ulong session, unsigned char *data, ck_ulong data_len,
                            unsigned char *signature, ck_ulong *signature_len);
typedef ck_ulong (*get_function_list_fn)(struct function_list **list);

static struct function_list list;
static sign_fn real_sign;

static ck_ulong stalling_sign(ck_ulong session, unsigned char *data, ck_ulong data_len,
                              unsigned char *signature, ck_ulong *signature_len) {
    const char *stall = getenv("TSA_TEST_STALL_FILE");
    while (stall != NULL && access(stall, F_OK) == 0) {
        usleep(10000);
    }
    return real_sign(session, data, data_len, signature, signature_len);
}

ck_ulong C_GetFunctionList(struct function_list **out) {
    if (out == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    if (real_sign == NULL) {
        const char *path = getenv("TSA_TEST_STALL_MODULE");
        void *module = path != NULL ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        if (module == NULL) {
            return CKR_GENERAL_ERROR;
        }
        get_function_list_fn get;
        *(void **)&get = dlsym(module, "C_GetFunctionList");
        struct function_list *real = NULL;
        if (get == NULL || get(&real) != CKR_OK || real == NULL) {
            return CKR_GENERAL_ERROR;
        }
        memcpy(&list, real, sizeof list);
        real_sign = (sign_fn)list.functions[C_SIGN];
        list.functions[C_SIGN] = (void (*)(void))stalling_sign;
    }
    *out = &list;
    return CKR_OK;
}
